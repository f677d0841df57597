//! Progress reporting. Libraries never print: they tell an observer what they are doing, and
//! the program that called them decides how to show it (kiln's CLI draws a bar per stage on a
//! terminal and prints a percentage line every few seconds otherwise; tests and servers stay
//! silent).
//!
//! The trait lives here, in the lowest crate that every library reporting progress depends on
//! (kiln-build, kiln-ship), so no library has to depend on another just for it.

/// An observer of a long-running operation. Every method has an empty default, so an
/// implementation shows only what it cares about. Calls come from any thread (writers hash
/// and compress on all cores), hence `Sync`.
pub trait Progress: Sync {
    /// A stage that will process about `total` bytes starts (`None`: the size is unknown).
    /// The stage lasts until the next [`Progress::done`] or [`Progress::begin`].
    fn begin(&self, _stage: &str, _total: Option<u64>) {}
    /// `bytes` more bytes of the current stage are done.
    fn advance(&self, _bytes: u64) {}
    /// `done` bytes of the current stage are done in all (for writers that count cumulatively;
    /// calls from several threads may arrive out of order, so a smaller value is ignored).
    fn position(&self, _done: u64) {}
    /// A stage finished; `summary` says what it produced, in one line.
    fn done(&self, _summary: &str) {}
    /// Something the user should read that is not a stage: "resuming at byte N", "keep x",
    /// a warning.
    fn note(&self, _message: &str) {}
}

/// Shows nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Silent;

impl Progress for Silent {}

/// Calls [`Progress::advance`] for a writer's callback that reports byte deltas.
pub fn advancing(p: &dyn Progress) -> impl Fn(u64) + Sync + '_ {
    move |n| p.advance(n)
}

/// Calls [`Progress::position`] for a writer's callback that reports cumulative bytes.
pub fn positioning(p: &dyn Progress) -> impl Fn(u64) + Sync + '_ {
    move |n| p.position(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record(Mutex<Vec<String>>);

    impl Progress for Record {
        fn begin(&self, stage: &str, total: Option<u64>) {
            self.0
                .lock()
                .unwrap()
                .push(format!("begin {stage} {total:?}"));
        }
        fn advance(&self, bytes: u64) {
            self.0.lock().unwrap().push(format!("+{bytes}"));
        }
        fn position(&self, done: u64) {
            self.0.lock().unwrap().push(format!("={done}"));
        }
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn adapters_forward_to_the_observer() {
        let r = Record::default();
        r.begin("x", Some(10));
        advancing(&r)(3);
        positioning(&r)(7);
        Silent.advance(1);
        assert_eq!(*r.0.lock().unwrap(), ["begin x Some(10)", "+3", "=7"]);
    }
}
