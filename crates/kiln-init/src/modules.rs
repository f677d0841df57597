//! The kernel's module database as depmod(8) writes it under `/lib/modules/VERSION`, and the
//! order kmod's modprobe(8) loads modules in. Shared by the initrd builder (which resolves
//! what goes into an initrd, and why) and by kiln-init (which loads modules at boot and answers
//! the kernel's `request_module` calls as `/sbin/modprobe`), so both resolve the same closure.
//!
//! Files read (all text, as depmod writes them; see kmod's `depmod.c` and `modprobe.d(5)`):
//!
//! | file | line format | meaning |
//! |---|---|---|
//! | `modules.dep` | `kernel/x/a.ko[.xz]: kernel/y/b.ko …` | a module's path and every module it needs symbols from (the whole transitive set, ordered so the last one needs none of the others) |
//! | `modules.builtin` | `kernel/x/a.ko` | modules compiled into the kernel: asking for one is not an error |
//! | `modules.builtin.modinfo` | `name.key=value` records separated by NUL bytes | the built-in modules' modinfo; its `alias=` keys tell which aliases the kernel answers itself |
//! | `modules.softdep` | `softdep NAME pre: a b post: c` | modules to load before (`pre:`) or after (`post:`) NAME when present; the names may be aliases (`crypto-crc32c`) |
//! | `modules.weakdep` | `weakdep NAME other` | modules NAME may ask for at run time (kmod 33); modprobe does not load them, initrd builders include them |
//! | `modules.alias` | `alias PATTERN NAME` | the kernel asks for devices, filesystems and crypto algorithms by alias (`pci:v00001AF4d…`, `fs-erofs`, `crypto-sha256`); the pattern is a shell glob |
//!
//! Module names are normalised as kmod normalises them: the file name without `.ko` and
//! without a compression suffix, `-` written as `_` (`dm-verity.ko.xz` is `dm_verity`). Aliases
//! are compared with `-` as `_` too, except inside `[…]` of a pattern.

use std::collections::{BTreeMap, BTreeSet};

/// The compression suffixes kernels ship modules with (`CONFIG_MODULE_COMPRESS_*`).
pub const COMPRESSED_SUFFIXES: &[&str] = &[".xz", ".zst", ".gz"];

/// The name kmod knows a module by: `kernel/drivers/md/dm-verity.ko.xz`, `dm-verity` and
/// `dm_verity` are all `dm_verity`.
pub fn module_name(s: &str) -> String {
    let base = s.rsplit('/').next().unwrap_or(s);
    let base = COMPRESSED_SUFFIXES
        .iter()
        .find_map(|x| base.strip_suffix(x))
        .unwrap_or(base);
    let base = base.strip_suffix(".ko").unwrap_or(base);
    base.replace('-', "_")
}

/// An alias (or alias pattern) as kmod compares it: `-` becomes `_` outside `[…]`.
pub fn alias_normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_class = false;
    for ch in s.chars() {
        match ch {
            '[' => in_class = true,
            ']' => in_class = false,
            _ => {}
        }
        out.push(if ch == '-' && !in_class { '_' } else { ch });
    }
    out
}

/// Shell-style glob matching as fnmatch(3) without flags: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`
/// (and `[^x]`), `\` escaping the next character. Iterative, with one backtrack point, so it
/// runs in O(len(pattern) × len(text)) at worst.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('?') => Some(pi + 1),
            Some('[') => match class_match(&p, pi, t[ti]) {
                Some((true, next)) => Some(next),
                Some((false, _)) => None,
                // An unterminated class is a literal '['.
                None => (t[ti] == '[').then_some(pi + 1),
            },
            Some('\\') if pi + 1 < p.len() => (p[pi + 1] == t[ti]).then_some(pi + 2),
            Some(c) => (*c == t[ti]).then_some(pi + 1),
            None => None,
        };
        match step {
            Some(next) => {
                pi = next;
                ti += 1;
            }
            None => match star {
                // Let the last '*' swallow one more character and retry.
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`: (matched, index after `]`), or
/// `None` when the class has no closing bracket.
fn class_match(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let ch = *p.get(i)?;
        if ch == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&e| e != ']') {
            let end = p[i + 2];
            if ch <= c && c <= end {
                matched = true;
            }
            i += 3;
        } else {
            if ch == c {
                matched = true;
            }
            i += 1;
        }
    }
}

/// One module of `modules.dep`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    /// Path relative to the modules directory, as in `modules.dep` (`kernel/fs/erofs/erofs.ko`).
    pub path: String,
    /// Names of the modules it needs, in `modules.dep` order (load them last to first).
    pub deps: Vec<String>,
}

/// The soft dependencies of one module.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoftDeps {
    /// Load these first when they exist (module names or aliases, as written).
    pub pre: Vec<String>,
    /// Load these afterwards when they exist.
    pub post: Vec<String>,
}

/// What a name asked for (by a configuration, a user or the kernel) turns out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A module of `modules.dep`.
    Module(String),
    /// A module built into the kernel.
    Builtin(String),
    /// An alias that these modules provide (all of them are loaded, as modprobe does).
    Alias(Vec<String>),
    /// An alias the kernel provides itself (a built-in module's alias).
    BuiltinAlias(String),
    /// Nothing of that name.
    Unknown,
}

/// The module database of one kernel.
#[derive(Clone, Debug, Default)]
pub struct ModuleDb {
    /// Name → module.
    pub modules: BTreeMap<String, Module>,
    /// Names of the modules built into the kernel.
    pub builtin: BTreeSet<String>,
    /// Normalised alias → built-in module.
    pub builtin_aliases: BTreeMap<String, String>,
    /// Name → soft dependencies.
    pub softdeps: BTreeMap<String, SoftDeps>,
    /// Name → weak dependencies.
    pub weakdeps: BTreeMap<String, Vec<String>>,
    /// (normalised pattern, module name) in file order.
    pub aliases: Vec<(String, String)>,
}

/// Why a module is in a closure: what asked for it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Asked for by name; the text says what for (`"dm-verity root"`, `"[boot] modules"`).
    Requested(String),
    /// It provides `alias`, which was asked for (the text says why).
    Provides {
        /// The alias asked for.
        alias: String,
        /// Why the alias was asked for.
        why: String,
    },
    /// The named module needs its symbols (`modules.dep`).
    DependencyOf(String),
    /// A `pre:` soft dependency of the named module (possibly through an alias).
    SoftPre(String),
    /// A `post:` soft dependency of the named module.
    SoftPost(String),
    /// A weak dependency of the named module (`modules.weakdep`).
    Weak(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Requested(w) => write!(f, "requested: {w}"),
            Reason::Provides { alias, why } => write!(f, "provides {alias} ({why})"),
            Reason::DependencyOf(m) => write!(f, "needed by {m} (modules.dep)"),
            Reason::SoftPre(m) => write!(f, "loaded before {m} (modules.softdep pre:)"),
            Reason::SoftPost(m) => write!(f, "loaded after {m} (modules.softdep post:)"),
            Reason::Weak(m) => write!(f, "{m} may ask for it (modules.weakdep)"),
        }
    }
}

/// A resolved set of modules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Closure {
    /// Modules in load order (every module after the modules it needs), each with the first
    /// reason it was reached by.
    pub order: Vec<(String, Reason)>,
    /// Names asked for that the kernel has built in.
    pub builtin: Vec<(String, Reason)>,
    /// Names (modules or aliases) that nothing provides, with why they were asked for.
    pub unresolved: Vec<(String, Reason)>,
}

impl Closure {
    /// The module names in load order.
    pub fn names(&self) -> Vec<String> {
        self.order.iter().map(|(n, _)| n.clone()).collect()
    }

    /// True when `name` is in the load order.
    pub fn contains(&self, name: &str) -> bool {
        self.order.iter().any(|(n, _)| n == name)
    }
}

/// How deep dependency chains may go before they count as circular.
const MAX_DEPTH: usize = 64;

/// Which soft and weak dependencies a closure follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Follow {
    /// `pre:` and `post:` soft dependencies (modprobe follows them).
    pub softdeps: bool,
    /// Weak dependencies (modprobe does not load them; an initrd should carry them).
    pub weakdeps: bool,
}

impl ModuleDb {
    /// Parses `modules.dep`. Errors name the line.
    pub fn parse_dep(&mut self, text: &str) -> Result<(), String> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, deps) = line
                .split_once(':')
                .ok_or_else(|| format!("modules.dep line {}: no ':' in {line:?}", i + 1))?;
            let path = path.trim();
            if path.is_empty() || !path.contains(".ko") {
                return Err(format!(
                    "modules.dep line {}: {path:?} is not a module path",
                    i + 1
                ));
            }
            self.modules.insert(
                module_name(path),
                Module {
                    path: path.to_string(),
                    deps: deps.split_whitespace().map(module_name).collect(),
                },
            );
        }
        Ok(())
    }

    /// Parses `modules.builtin`.
    pub fn parse_builtin(&mut self, text: &str) {
        for line in text.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') {
                self.builtin.insert(module_name(line));
            }
        }
    }

    /// Parses `modules.builtin.modinfo` (NUL-separated `name.key=value` records) for the
    /// built-in modules' aliases. Records that are not `name.alias=…` are skipped.
    pub fn parse_builtin_modinfo(&mut self, bytes: &[u8]) {
        for rec in bytes.split(|&b| b == 0) {
            let Ok(rec) = std::str::from_utf8(rec) else {
                continue;
            };
            let Some((key, value)) = rec.split_once('=') else {
                continue;
            };
            if let Some(name) = key.strip_suffix(".alias") {
                if !name.is_empty() && !value.is_empty() {
                    let m = module_name(name);
                    self.builtin.insert(m.clone());
                    self.builtin_aliases.insert(alias_normalize(value), m);
                }
            }
        }
    }

    /// Parses `modules.softdep` (and `softdep` lines of modprobe.d files). Errors name the line.
    pub fn parse_softdep(&mut self, text: &str) -> Result<(), String> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.is_empty() || w[0] != "softdep" {
                continue;
            }
            let Some(name) = w.get(1) else {
                return Err(format!(
                    "modules.softdep line {}: softdep without a module",
                    i + 1
                ));
            };
            let entry = self.softdeps.entry(module_name(name)).or_default();
            // Names before any `pre:`/`post:` are pre-dependencies (kmod reads them so).
            let mut post = false;
            for x in &w[2..] {
                match *x {
                    "pre:" => post = false,
                    "post:" => post = true,
                    m if post => entry.post.push(m.to_string()),
                    m => entry.pre.push(m.to_string()),
                }
            }
        }
        Ok(())
    }

    /// Parses `modules.weakdep`.
    pub fn parse_weakdep(&mut self, text: &str) {
        for raw in text.lines() {
            let line = raw.split('#').next().unwrap_or("").trim();
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.len() >= 3 && w[0] == "weakdep" {
                self.weakdeps
                    .entry(module_name(w[1]))
                    .or_default()
                    .extend(w[2..].iter().map(|s| s.to_string()));
            }
        }
    }

    /// Parses `modules.alias`. Errors name the line.
    pub fn parse_alias(&mut self, text: &str) -> Result<(), String> {
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["alias", pattern, name] => self
                    .aliases
                    .push((alias_normalize(pattern), module_name(name))),
                _ => {
                    return Err(format!(
                        "modules.alias line {}: expected `alias PATTERN MODULE`, found {line:?}",
                        i + 1
                    ))
                }
            }
        }
        Ok(())
    }

    /// What `name` is: a module, a built-in module, or an alias (of modules or of a built-in).
    pub fn lookup(&self, name: &str) -> Lookup {
        let m = module_name(name);
        // A plain module name has no path separators or glob characters; anything else can
        // only be an alias (`pci:v…`, `crypto-sha256`).
        if self.modules.contains_key(&m) {
            return Lookup::Module(m);
        }
        if self.builtin.contains(&m) {
            return Lookup::Builtin(m);
        }
        let a = alias_normalize(name);
        let mut found: Vec<String> = Vec::new();
        for (pattern, module) in &self.aliases {
            if glob_match(pattern, &a) && !found.contains(module) {
                found.push(module.clone());
            }
        }
        // Providers that are built in need no loading; the rest are loaded.
        let loadable: Vec<String> = found
            .iter()
            .filter(|m| self.modules.contains_key(*m))
            .cloned()
            .collect();
        if !loadable.is_empty() {
            return Lookup::Alias(loadable);
        }
        if let Some(b) = found.iter().find(|m| self.builtin.contains(*m)) {
            return Lookup::BuiltinAlias(b.clone());
        }
        match self.builtin_aliases.get(&a) {
            Some(b) => Lookup::BuiltinAlias(b.clone()),
            None => Lookup::Unknown,
        }
    }

    /// The built-in module that answers `alias`, if one does.
    pub fn builtin_alias(&self, alias: &str) -> Option<&str> {
        self.builtin_aliases
            .get(&alias_normalize(alias))
            .map(String::as_str)
    }

    /// Resolves `requests` (names or aliases, each with why it is asked for) into load order,
    /// the way modprobe would load each of them: a module's dependencies first (each with its
    /// own soft dependencies), then its `pre:` soft dependencies, the module, its `post:` soft
    /// dependencies. Soft and weak dependencies that nothing provides are listed in
    /// `unresolved`, as are requests that nothing provides; a dependency that `modules.dep`
    /// names but does not list is an error (a broken database).
    pub fn closure(
        &self,
        requests: &[(String, Reason)],
        follow: Follow,
    ) -> Result<Closure, String> {
        let mut c = Closure::default();
        let mut seen = BTreeSet::new();
        for (name, why) in requests {
            self.add(name, why.clone(), follow, &mut seen, &mut c, 0)?;
        }
        Ok(c)
    }

    fn add(
        &self,
        name: &str,
        why: Reason,
        follow: Follow,
        seen: &mut BTreeSet<String>,
        c: &mut Closure,
        depth: usize,
    ) -> Result<(), String> {
        match self.lookup(name) {
            Lookup::Module(m) => self.visit(&m, why, follow, seen, c, depth),
            Lookup::Builtin(m) | Lookup::BuiltinAlias(m) => {
                if !c.builtin.iter().any(|(b, _)| *b == m) {
                    c.builtin.push((m, why));
                }
                Ok(())
            }
            Lookup::Alias(mods) => {
                let via = Reason::Provides {
                    alias: name.to_string(),
                    why: match &why {
                        Reason::Requested(w) => w.clone(),
                        other => other.to_string(),
                    },
                };
                for m in mods {
                    self.visit(&m, via.clone(), follow, seen, c, depth)?;
                }
                Ok(())
            }
            Lookup::Unknown => {
                if !c.unresolved.iter().any(|(u, _)| u == name) {
                    c.unresolved.push((name.to_string(), why));
                }
                Ok(())
            }
        }
    }

    fn visit(
        &self,
        name: &str,
        why: Reason,
        follow: Follow,
        seen: &mut BTreeSet<String>,
        c: &mut Closure,
        depth: usize,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!(
                "modules.dep: the dependencies through {name} are circular or deeper than {MAX_DEPTH}"
            ));
        }
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(module) = self.modules.get(name) else {
            return Err(format!("modules.dep: {name} is not listed"));
        };
        // modules.dep orders a module's dependencies so that the last one needs none of the
        // others: load them last to first.
        for d in module.deps.iter().rev() {
            if self.modules.contains_key(d) {
                self.visit(
                    d,
                    Reason::DependencyOf(name.into()),
                    follow,
                    seen,
                    c,
                    depth + 1,
                )?;
            } else if !self.builtin.contains(d) {
                return Err(format!(
                    "modules.dep: {name} needs {d}, which is neither listed nor built in"
                ));
            }
        }
        let soft = if follow.softdeps {
            self.softdeps.get(name)
        } else {
            None
        };
        if let Some(s) = soft {
            for p in &s.pre {
                self.add(p, Reason::SoftPre(name.into()), follow, seen, c, depth + 1)?;
            }
        }
        c.order.push((name.to_string(), why));
        if let Some(s) = soft {
            for p in &s.post {
                self.add(p, Reason::SoftPost(name.into()), follow, seen, c, depth + 1)?;
            }
        }
        if follow.weakdeps {
            for w in self.weakdeps.get(name).into_iter().flatten() {
                self.add(w, Reason::Weak(name.into()), follow, seen, c, depth + 1)?;
            }
        }
        Ok(())
    }

    /// This database cut down to `keep` (module names): their `modules.dep` lines with paths
    /// changed by `path`, the alias, soft and weak dependency lines that concern them, the
    /// built-in lists whole. Written into an initrd, it lets kiln-init resolve what the kernel
    /// asks for at boot without carrying the whole tree's database.
    pub fn render_subset(
        &self,
        keep: &[String],
        path: impl Fn(&str) -> String,
    ) -> BTreeMap<&'static str, Vec<u8>> {
        use std::fmt::Write as _;
        let set: BTreeSet<&str> = keep.iter().map(String::as_str).collect();
        let mut dep = String::new();
        for name in keep {
            if let Some(m) = self.modules.get(name) {
                let deps: Vec<String> = m
                    .deps
                    .iter()
                    .filter_map(|d| self.modules.get(d).map(|dm| path(&dm.path)))
                    .collect();
                let _ = writeln!(dep, "{}: {}", path(&m.path), deps.join(" "));
            }
        }
        let mut alias = String::new();
        for (pattern, name) in &self.aliases {
            if set.contains(name.as_str()) {
                let _ = writeln!(alias, "alias {pattern} {name}");
            }
        }
        let mut soft = String::new();
        for (name, s) in &self.softdeps {
            if set.contains(name.as_str()) {
                let mut l = format!("softdep {name}");
                if !s.pre.is_empty() {
                    l.push_str(" pre: ");
                    l.push_str(&s.pre.join(" "));
                }
                if !s.post.is_empty() {
                    l.push_str(" post: ");
                    l.push_str(&s.post.join(" "));
                }
                let _ = writeln!(soft, "{l}");
            }
        }
        let mut weak = String::new();
        for (name, w) in &self.weakdeps {
            if set.contains(name.as_str()) {
                let _ = writeln!(weak, "weakdep {name} {}", w.join(" "));
            }
        }
        let mut builtin = String::new();
        for b in &self.builtin {
            let _ = writeln!(builtin, "{b}");
        }
        let mut modinfo = Vec::new();
        for (a, m) in &self.builtin_aliases {
            modinfo.extend_from_slice(format!("{m}.alias={a}").as_bytes());
            modinfo.push(0);
        }
        BTreeMap::from([
            ("modules.dep", dep.into_bytes()),
            ("modules.alias", alias.into_bytes()),
            ("modules.softdep", soft.into_bytes()),
            ("modules.weakdep", weak.into_bytes()),
            ("modules.builtin", builtin.into_bytes()),
            ("modules.builtin.modinfo", modinfo),
        ])
    }
}

/// The files [`ModuleDb::load_dir`] reads, in the order it reads them.
pub const DB_FILES: &[&str] = &[
    "modules.dep",
    "modules.builtin",
    "modules.builtin.modinfo",
    "modules.softdep",
    "modules.weakdep",
    "modules.alias",
];

impl ModuleDb {
    /// Builds the database from the files' contents, as `read(name)` returns them (`None` for
    /// a file that does not exist). `modules.dep` is required; errors name the file and line.
    pub fn from_files(
        mut read: impl FnMut(&str) -> Result<Option<Vec<u8>>, String>,
    ) -> Result<Self, String> {
        let mut db = ModuleDb::default();
        let text = |name: &str, b: Vec<u8>| {
            String::from_utf8(b).map_err(|e| {
                format!(
                    "{name}: not UTF-8 text (byte {})",
                    e.utf8_error().valid_up_to()
                )
            })
        };
        let dep = read("modules.dep")?.ok_or("modules.dep: no such file (run depmod)")?;
        db.parse_dep(&text("modules.dep", dep)?)?;
        if let Some(b) = read("modules.builtin")? {
            db.parse_builtin(&text("modules.builtin", b)?);
        }
        if let Some(b) = read("modules.builtin.modinfo")? {
            db.parse_builtin_modinfo(&b);
        }
        if let Some(b) = read("modules.softdep")? {
            db.parse_softdep(&text("modules.softdep", b)?)?;
        }
        if let Some(b) = read("modules.weakdep")? {
            db.parse_weakdep(&text("modules.weakdep", b)?);
        }
        if let Some(b) = read("modules.alias")? {
            db.parse_alias(&text("modules.alias", b)?)?;
        }
        Ok(db)
    }

    /// Reads the database of a modules directory on this machine (`/lib/modules/VERSION`).
    pub fn load_dir(dir: &str) -> Result<Self, String> {
        Self::from_files(|name| {
            let p = format!("{dir}/{name}");
            match std::fs::read(&p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(format!("read {p}: {e}")),
            }
        })
        .map_err(|e| format!("{dir}/{e}"))
    }
}

/// The compression of a module file, from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleCompression {
    /// A plain `.ko`.
    None,
    /// `.ko.xz`.
    Xz,
    /// `.ko.zst`.
    Zstd,
    /// `.ko.gz`.
    Gzip,
}

impl ModuleCompression {
    /// From the file name.
    pub fn of(path: &str) -> Self {
        if path.ends_with(".xz") {
            ModuleCompression::Xz
        } else if path.ends_with(".zst") {
            ModuleCompression::Zstd
        } else if path.ends_with(".gz") {
            ModuleCompression::Gzip
        } else {
            ModuleCompression::None
        }
    }

    /// The name `/sys/module/compression` gives it (`CONFIG_MODULE_DECOMPRESS`).
    pub fn kernel_name(self) -> &'static str {
        match self {
            ModuleCompression::None => "none",
            ModuleCompression::Xz => "xz",
            ModuleCompression::Zstd => "zstd",
            ModuleCompression::Gzip => "gzip",
        }
    }
}

/// Largest module kiln decompresses (the biggest in-tree modules are around 100 MiB).
pub const MAX_MODULE_SIZE: u64 = 512 << 20;

/// Decompresses a module file's bytes according to its name; plain `.ko` bytes are returned as
/// they are. The output is bounded by [`MAX_MODULE_SIZE`]; errors name the path.
pub fn decompress(path: &str, data: Vec<u8>) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let limit = MAX_MODULE_SIZE;
    let mut out = Vec::new();
    let r = match ModuleCompression::of(path) {
        ModuleCompression::None => return Ok(data),
        ModuleCompression::Xz => xz2::read::XzDecoder::new(&data[..])
            .take(limit + 1)
            .read_to_end(&mut out),
        ModuleCompression::Zstd => zstd::stream::read::Decoder::new(&data[..])
            .and_then(|d| d.take(limit + 1).read_to_end(&mut out)),
        ModuleCompression::Gzip => flate2::read::GzDecoder::new(&data[..])
            .take(limit + 1)
            .read_to_end(&mut out),
    };
    r.map_err(|e| {
        format!(
            "{path}: {} decompression failed: {e}",
            ModuleCompression::of(path).kernel_name()
        )
    })?;
    if out.len() as u64 > limit {
        return Err(format!(
            "{path}: decompresses to more than {} MiB, which no kernel module is",
            limit >> 20
        ));
    }
    if out.get(..4) != Some(b"\x7fELF") {
        return Err(format!("{path}: decompressed, but not an ELF object"));
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases_normalise_like_kmod() {
        assert_eq!(module_name("kernel/drivers/md/dm-verity.ko"), "dm_verity");
        assert_eq!(module_name("dm-mod.ko.zst"), "dm_mod");
        assert_eq!(module_name("crc32c-intel.ko.xz"), "crc32c_intel");
        assert_eq!(module_name("virtio_pci"), "virtio_pci");
        assert_eq!(alias_normalize("crypto-crc32c"), "crypto_crc32c");
        assert_eq!(
            alias_normalize("usb:v*p*d*dc*dsc*dp*ic08isc0[1-6]ip50in*"),
            "usb:v*p*d*dc*dsc*dp*ic08isc0[1-6]ip50in*"
        );
        assert_eq!(alias_normalize("a-b[x-y]c-d"), "a_b[x-y]c_d");
    }

    #[test]
    fn glob_matches_like_fnmatch() {
        for (p, t, want) in [
            ("crypto_sha256", "crypto_sha256", true),
            ("crypto_sha256", "crypto_sha25", false),
            (
                "pci:v00001AF4d00001042sv*sd*bc*sc*i*",
                "pci:v00001AF4d00001042sv00001AF4sd00001100bc01sc00i00",
                true,
            ),
            (
                "pci:v00001AF4d00001042sv*sd*bc*sc*i*",
                "pci:v00001AF4d00001041sv00001AF4sd00001100bc01sc00i00",
                false,
            ),
            (
                "usb:v*p*d*dc*dsc*dp*ic08isc06ip50in*",
                "usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00",
                true,
            ),
            (
                "usb:v*p*d*dc*dsc*dp*ic08isc06ip62in*",
                "usb:v46F4p0001d0000dc00dsc00dp00ic08isc06ip50in00",
                false,
            ),
            ("scsi:t_0x0[05]*", "scsi:t_0x05", true),
            ("scsi:t_0x0[05]*", "scsi:t_0x04", false),
            ("a[!b]c", "axc", true),
            ("a[!b]c", "abc", false),
            ("a[^b]c", "abc", false),
            ("d[0-9]?", "d7x", true),
            ("d[0-9]?", "dxx", false),
            ("[]]x", "]x", true),
            ("a[bc", "a[bc", true),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("\\*x", "*x", true),
            ("\\*x", "ax", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob_match(p, t), want, "{p:?} vs {t:?}");
        }
        // No exponential blow-up on patterns full of stars.
        let p = "*a".repeat(30);
        let t = "a".repeat(29) + "b";
        assert!(!glob_match(&p, &t));
    }

    /// The shape of Debian 12's generic kernel: libcrc32c needs a crc32c implementation that
    /// only `modules.softdep` and `modules.alias` name; sha256 is built in.
    fn db() -> ModuleDb {
        let mut db = ModuleDb::default();
        db.parse_dep(
            "\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/md/dm-verity.ko: kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-bufio.ko: kernel/drivers/md/dm-mod.ko
kernel/drivers/md/dm-mod.ko:
kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz
kernel/lib/libcrc32c.ko.xz:
kernel/crypto/crc32c_generic.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/arch/x86/crypto/sha256-ssse3.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/drivers/ipmi/ipmi_msghandler.ko:
kernel/drivers/ipmi/ipmi_devintf.ko: kernel/drivers/ipmi/ipmi_msghandler.ko
",
        )
        .unwrap();
        db.parse_builtin("kernel/crypto/sha256_generic.ko\nkernel/fs/vfat/vfat.ko\n");
        db.parse_builtin_modinfo(b"sha256_generic.alias=crypto-sha256\0sha256_generic.alias=sha256\0sha256_generic.license=GPL\0junk\0");
        db.parse_softdep(
            "# Soft dependencies extracted from modules themselves.\n\
             softdep ext4 pre: crypto-crc32c\n\
             softdep jbd2 pre: crypto-crc32c\n\
             softdep libcrc32c pre: crc32c\n\
             softdep ipmi_msghandler post: ipmi_devintf\n\
             softdep erofs pre: no-such-thing\n",
        )
        .unwrap();
        db.parse_weakdep("weakdep dm_verity crypto-sha256\n");
        db.parse_alias(
            "alias crypto-crc32c crc32c_generic\n\
             alias crc32c crc32c_generic\n\
             alias crypto-crc32c-generic crc32c_generic\n\
             alias crypto-crc32c crc32c_intel\n\
             alias crc32c crc32c_intel\n\
             alias crypto-sha256 sha256_ssse3\n\
             alias fs-erofs erofs\n\
             alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n",
        )
        .unwrap();
        db
    }

    fn req(names: &[&str]) -> Vec<(String, Reason)> {
        names
            .iter()
            .map(|n| (n.to_string(), Reason::Requested("test".into())))
            .collect()
    }

    const SOFT: Follow = Follow {
        softdeps: true,
        weakdeps: false,
    };

    #[test]
    fn lookup_finds_modules_builtins_and_aliases() {
        let db = db();
        assert_eq!(db.lookup("dm-verity"), Lookup::Module("dm_verity".into()));
        assert_eq!(db.lookup("vfat"), Lookup::Builtin("vfat".into()));
        assert_eq!(
            db.lookup("crypto-crc32c"),
            Lookup::Alias(vec!["crc32c_generic".into(), "crc32c_intel".into()])
        );
        assert_eq!(db.lookup("fs-erofs"), Lookup::Alias(vec!["erofs".into()]));
        assert_eq!(
            db.lookup("pci:v00001AF4d00001042sv00001AF4sd00001100bc01sc00i00"),
            Lookup::Alias(vec!["virtio_pci".into()])
        );
        assert_eq!(
            db.lookup("crypto-sha256"),
            Lookup::Alias(vec!["sha256_ssse3".into()])
        );
        assert_eq!(
            db.lookup("sha256"),
            Lookup::BuiltinAlias("sha256_generic".into())
        );
        assert_eq!(db.lookup("crypto-md5"), Lookup::Unknown);
    }

    #[test]
    fn closure_follows_deps_softdeps_and_aliases_in_kmod_order() {
        let db = db();
        let c = db
            .closure(
                &req(&["erofs", "dm-verity", "virtio_pci", "vfat", "ext4"]),
                SOFT,
            )
            .unwrap();
        let names = c.names();
        let pos = |n: &str| {
            names
                .iter()
                .position(|x| x == n)
                .unwrap_or_else(|| panic!("{n} not in {names:?}"))
        };
        // crc32c (through libcrc32c's softdep and the alias) before libcrc32c before erofs.
        assert!(pos("crc32c_generic") < pos("libcrc32c"));
        assert!(pos("crc32c_intel") < pos("libcrc32c"));
        assert!(pos("libcrc32c") < pos("erofs"));
        assert!(pos("dm_mod") < pos("dm_bufio") && pos("dm_bufio") < pos("dm_verity"));
        for d in [
            "virtio",
            "virtio_ring",
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
        ] {
            assert!(pos(d) < pos("virtio_pci"), "{d}: {names:?}");
        }
        // ext4's dependencies, then its crypto-crc32c softdep (already there), then ext4.
        assert!(pos("jbd2") < pos("ext4") && pos("crc16") < pos("ext4"));
        assert_eq!(names.iter().filter(|n| *n == "crc32c_generic").count(), 1);
        assert_eq!(
            c.builtin,
            vec![("vfat".to_string(), Reason::Requested("test".into()))]
        );
        // erofs's made-up softdep is reported, not fatal.
        assert_eq!(c.unresolved.len(), 1);
        assert_eq!(c.unresolved[0].0, "no-such-thing");
        assert_eq!(c.unresolved[0].1, Reason::SoftPre("erofs".into()));
        let why = |n: &str| c.order.iter().find(|(m, _)| m == n).unwrap().1.to_string();
        assert_eq!(why("libcrc32c"), "needed by erofs (modules.dep)");
        assert_eq!(
            why("crc32c_generic"),
            "provides crc32c (loaded before libcrc32c (modules.softdep pre:))"
        );
        assert_eq!(why("erofs"), "requested: test");
        // Post soft dependencies come after their module.
        let c = db.closure(&req(&["ipmi_msghandler"]), SOFT).unwrap();
        assert_eq!(c.names(), ["ipmi_msghandler", "ipmi_devintf"]);
        // Without softdeps, libcrc32c's implementation is not found: that is issue #15.
        let none = Follow {
            softdeps: false,
            weakdeps: false,
        };
        let c = db.closure(&req(&["erofs"]), none).unwrap();
        assert_eq!(c.names(), ["libcrc32c", "erofs"]);
        // Weak dependencies on request.
        let c = db
            .closure(
                &req(&["dm_verity"]),
                Follow {
                    softdeps: true,
                    weakdeps: true,
                },
            )
            .unwrap();
        assert!(c.contains("sha256_ssse3"), "{:?}", c.names());
        // Unknown requests are listed with their reason.
        let c = db.closure(&req(&["nosuch", "crypto-md5"]), SOFT).unwrap();
        assert_eq!(
            c.unresolved
                .iter()
                .map(|u| u.0.as_str())
                .collect::<Vec<_>>(),
            ["nosuch", "crypto-md5"]
        );
    }

    #[test]
    fn broken_databases_are_errors_naming_the_line() {
        let mut db = ModuleDb::default();
        let e = db.parse_dep("kernel/a.ko:\ngarbage line\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
        let e = db.parse_dep(": kernel/a.ko\n").unwrap_err();
        assert!(e.contains("not a module path"), "{e}");
        let e = db.parse_alias("alias onlytwo\n").unwrap_err();
        assert!(e.contains("modules.alias line 1"), "{e}");
        let e = db.parse_softdep("softdep\n").unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        // A dependency that is not listed, and a cycle.
        let mut db = ModuleDb::default();
        db.parse_dep("a.ko: b.ko\n").unwrap();
        let e = db.closure(&req(&["a"]), SOFT).unwrap_err();
        assert!(e.contains("a needs b"), "{e}");
        let mut db = ModuleDb::default();
        db.parse_dep("a.ko: b.ko\nb.ko: a.ko\n").unwrap();
        // Already-seen modules stop the recursion, so a two-module cycle still resolves.
        assert_eq!(db.closure(&req(&["a"]), SOFT).unwrap().names(), ["b", "a"]);
        let e = ModuleDb::from_files(|_| Ok(None)).unwrap_err();
        assert!(e.contains("modules.dep: no such file"), "{e}");
        let e = ModuleDb::from_files(|n| Ok((n == "modules.dep").then(|| vec![0xff, b'\n'])))
            .unwrap_err();
        assert!(e.contains("modules.dep: not UTF-8"), "{e}");
    }

    #[test]
    fn subset_round_trips_through_from_files() {
        let db = db();
        let c = db.closure(&req(&["erofs", "dm_verity"]), SOFT).unwrap();
        let keep = c.names();
        let files = db.render_subset(&keep, |p| p.trim_end_matches(".xz").to_string());
        let sub = ModuleDb::from_files(|n| Ok(files.get(n).cloned())).unwrap();
        assert_eq!(
            sub.modules.keys().cloned().collect::<BTreeSet<_>>(),
            keep.iter().cloned().collect::<BTreeSet<_>>()
        );
        assert_eq!(sub.modules["erofs"].path, "kernel/fs/erofs/erofs.ko");
        assert_eq!(sub.modules["erofs"].deps, ["libcrc32c"]);
        // The kernel's request for crypto-crc32c resolves inside the initrd's subset too.
        assert_eq!(
            sub.lookup("crypto-crc32c"),
            Lookup::Alias(vec!["crc32c_generic".into(), "crc32c_intel".into()])
        );
        assert_eq!(
            sub.lookup("sha256"),
            Lookup::BuiltinAlias("sha256_generic".into())
        );
        assert_eq!(sub.softdeps["libcrc32c"].pre, ["crc32c"]);
        assert!(!sub.softdeps.contains_key("ext4"));
        assert_eq!(
            sub.closure(&req(&["erofs"]), SOFT).unwrap().names(),
            db.closure(&req(&["erofs"]), SOFT).unwrap().names()
        );
    }

    #[test]
    fn decompression_by_suffix_and_bounds() {
        use std::io::Write;
        let elf = b"\x7fELF module bytes".to_vec();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(&elf).unwrap();
        let xz = xz.finish().unwrap();
        let zst = zstd::stream::encode_all(&elf[..], 3).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decompress("a.ko.xz", xz).unwrap(), elf);
        assert_eq!(decompress("a.ko.zst", zst.clone()).unwrap(), elf);
        assert_eq!(decompress("a.ko.gz", gz).unwrap(), elf);
        assert_eq!(decompress("a.ko", elf.clone()).unwrap(), elf);
        let e = decompress("x/a.ko.xz", zst).unwrap_err();
        assert!(e.starts_with("x/a.ko.xz: xz decompression failed"), "{e}");
        let not_elf = zstd::stream::encode_all(&b"hello"[..], 3).unwrap();
        let e = decompress("a.ko.zst", not_elf).unwrap_err();
        assert!(e.contains("not an ELF"), "{e}");
        assert_eq!(ModuleCompression::of("a.ko.zst").kernel_name(), "zstd");
    }
}
