# Shared by the benchmark scripts (source it): a real tree copied once from this machine's /usr,
# at least 1.5 GB and 50k entries, and a timing helper around GNU time.
#
#   bench_tree WORKDIR     sets TREE, BYTES, ENTRIES (copies whole /usr subdirectories, in a
#                          fixed order, until both thresholds are met; kept between runs)
#   bench_run NAME CMD...  runs CMD under /usr/bin/time -v; sets NAME_wall (s), NAME_rss (KiB)
#   bench_ratio A B        prints A / B with three decimals

bench_tree() {
  local work=$1 min_bytes=$((1536 * 1024 * 1024)) min_entries=50000 d dest bytes entries
  TREE=$work/tree
  mkdir -p "$work"
  if [ ! -f "$work/tree.done" ]; then
    rm -rf "$TREE"
    mkdir -p "$TREE"
    for d in /usr/share /usr/lib/x86_64-linux-gnu /usr/bin /usr/lib/python3 /usr/include /usr/lib/gcc \
             /usr/sbin /usr/libexec /usr/lib/jvm /usr/lib/modules /usr/lib; do
      [ -d "$d" ] || continue
      bytes=$(du -sb "$TREE" | cut -f1)
      entries=$(find "$TREE" | wc -l)
      if [ "$bytes" -ge "$min_bytes" ] && [ "$entries" -ge "$min_entries" ]; then break; fi
      dest="$TREE${d}"
      [ -e "$dest" ] && continue
      mkdir -p "$(dirname "$dest")"
      echo "copying $d" >&2
      cp -a "$d" "$dest" 2>/dev/null || true
    done
    touch "$work/tree.done"
  fi
  BYTES=$(du -sb "$TREE" | cut -f1)
  ENTRIES=$(find "$TREE" | wc -l)
  if [ "$BYTES" -lt "$min_bytes" ] || [ "$ENTRIES" -lt "$min_entries" ]; then
    echo "only $BYTES bytes / $ENTRIES entries available under /usr" >&2
    return 1
  fi
  # Warm the page cache so that no tool pays for cold reads.
  find "$TREE" -type f -print0 | xargs -0 cat > /dev/null
}

bench_run() {
  local name=$1; shift
  [ -x /usr/bin/time ] || { echo "/usr/bin/time not found (apt-get install time)" >&2; return 1; }
  /usr/bin/time -v -o "$BENCH_WORK/$name.time" "$@" > "$BENCH_WORK/$name.out" 2> "$BENCH_WORK/$name.err" || {
    echo "$name failed:" >&2; cat "$BENCH_WORK/$name.err" >&2; return 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$BENCH_WORK/$name.time" |
         awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$BENCH_WORK/$name.time")
  eval "${name}_wall=$wall; ${name}_rss=$rss"
}

bench_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
