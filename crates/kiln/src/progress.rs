//! How the CLI shows the libraries' progress ([`kiln_tree::progress::Progress`]).
//!
//! On a terminal, each long stage gets an indicatif bar (bytes, rate, ETA) that is replaced by
//! the stage's one-line result when it ends. Without a terminal (a log, a pipe, CI) a bar would
//! be noise or nothing at all, so a long stage prints a percentage line every few seconds
//! (`KILN_PROGRESS_INTERVAL`, seconds, default 3) and each finished stage prints its result.
//! `-q` silences all of it; errors still go to stderr.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_tree::progress::Progress;

/// Renders progress for one command run; `prefix` starts every line (`kiln build`).
pub struct Renderer {
    inner: Arc<Inner>,
    /// Without a terminal: the thread that prints a line every interval, also while a writer
    /// reports nothing for a while (an EROFS writer reports per batch of files).
    ticker: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    prefix: &'static str,
    start: Instant,
    tty: bool,
    quiet: bool,
    interval: Duration,
    done: AtomicU64,
    stage: Mutex<Option<Stage>>,
    stop: (Mutex<bool>, Condvar),
}

struct Stage {
    name: String,
    total: Option<u64>,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

impl Renderer {
    /// Bars when stderr is a terminal, lines otherwise, nothing with `quiet`.
    pub fn new(prefix: &'static str, quiet: bool) -> Self {
        let interval = std::env::var("KILN_PROGRESS_INTERVAL")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map_or(Duration::from_secs(3), Duration::from_secs_f64);
        let inner = Arc::new(Inner {
            prefix,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            quiet,
            interval,
            done: AtomicU64::new(0),
            stage: Mutex::new(None),
            stop: (Mutex::new(false), Condvar::new()),
        });
        let ticker = (!inner.tty && !quiet).then(|| {
            let inner = Arc::clone(&inner);
            std::thread::spawn(move || inner.tick())
        });
        Self { inner, ticker }
    }

    /// Seconds since the run started.
    pub fn elapsed(&self) -> Duration {
        self.inner.start.elapsed()
    }

    /// Ends the run's output with one line: `PREFIX: LINE`.
    pub fn summary(&self, line: &str) {
        Inner::end_stage(&mut self.inner.lock());
        if !self.inner.quiet {
            eprintln!("{}: {line}", self.inner.prefix);
        }
    }
}

impl Inner {
    /// The ticker: a line per interval while a stage runs, until the renderer is dropped.
    fn tick(&self) {
        let (lock, cv) = &self.stop;
        let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*stopped {
            stopped = cv
                .wait_timeout(stopped, self.interval.max(Duration::from_millis(50)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if !*stopped {
                self.maybe_line();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Stage>> {
        // A panic while holding the lock only loses a progress line.
        self.stage.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end_stage(stage: &mut Option<Stage>) {
        if let Some(s) = stage.take() {
            if let Some(b) = s.bar {
                b.finish_and_clear();
            }
        }
    }

    /// Prints a percentage line when the interval has passed (no terminal only).
    fn maybe_line(&self) {
        if self.tty || self.quiet {
            return;
        }
        let mut guard = self.lock();
        let Some(s) = guard.as_mut() else { return };
        let now = Instant::now();
        if now.duration_since(s.last_line) < self.interval {
            return;
        }
        s.last_line = now;
        let done = self.done.load(Ordering::Relaxed);
        let secs = now.duration_since(s.started).as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let what = match s.total {
            Some(t) if t > 0 => format!(
                "{:>3}% ({} of {}",
                (done.min(t) * 100) / t,
                HumanBytes(done),
                HumanBytes(t)
            ),
            _ => format!("{} (", HumanBytes(done)),
        };
        eprintln!(
            "{} [{:>6.1}s] {}: {what}, {}/s)",
            self.prefix,
            self.start.elapsed().as_secs_f64(),
            s.name,
            HumanBytes(rate as u64)
        );
    }
}

impl Progress for Renderer {
    fn begin(&self, stage: &str, total: Option<u64>) {
        self.inner.begin(stage, total);
    }

    fn advance(&self, bytes: u64) {
        let done = self.inner.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.inner.show(done);
    }

    fn position(&self, done: u64) {
        let prev = self.inner.done.fetch_max(done, Ordering::Relaxed);
        self.inner.show(prev.max(done));
    }

    fn done(&self, summary: &str) {
        self.inner.done(summary);
    }

    fn note(&self, message: &str) {
        self.inner.note(message);
    }
}

impl Inner {
    fn begin(&self, stage: &str, total: Option<u64>) {
        if self.quiet {
            return;
        }
        let mut guard = self.lock();
        Self::end_stage(&mut guard);
        self.done.store(0, Ordering::Relaxed);
        let bar = self.tty.then(|| {
            let (b, template) = match total {
                Some(t) => (
                    ProgressBar::new(t),
                    "{prefix} {msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                ),
                None => (
                    ProgressBar::new_spinner(),
                    "{prefix} {msg} {spinner} {bytes} {bytes_per_sec}",
                ),
            };
            b.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            b.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_prefix(self.prefix);
            b.set_message(stage.to_string());
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        let now = Instant::now();
        *guard = Some(Stage {
            name: stage.to_string(),
            total,
            started: now,
            last_line: now,
            bar,
        });
    }

    fn done(&self, summary: &str) {
        if self.quiet {
            return;
        }
        let mut guard = self.lock();
        Self::end_stage(&mut guard);
        eprintln!(
            "{} [{:>6.1}s] {summary}",
            self.prefix,
            self.start.elapsed().as_secs_f64()
        );
    }

    fn note(&self, message: &str) {
        if self.quiet {
            return;
        }
        let guard = self.lock();
        match guard.as_ref().and_then(|s| s.bar.as_ref()) {
            Some(b) => b.suspend(|| eprintln!("{}: {message}", self.prefix)),
            None => eprintln!("{}: {message}", self.prefix),
        }
    }
}

impl Inner {
    fn show(&self, done: u64) {
        if self.quiet {
            return;
        }
        if self.tty {
            if let Some(b) = self.lock().as_ref().and_then(|s| s.bar.clone()) {
                b.set_position(done);
            }
        } else {
            self.maybe_line();
        }
    }
}

impl Drop for Renderer {
    fn drop(&mut self) {
        {
            let (lock, cv) = &self.inner.stop;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        Inner::end_stage(&mut self.inner.lock());
    }
}
