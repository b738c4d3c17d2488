//! Captured stdout/stderr of one run: a shared byte budget across both streams, truncation flags,
//! a wake-up for whoever streams new bytes as events, and incremental UTF-8 decoding.

use std::sync::Mutex;

use switchyard_core::code::Truncated;
use tokio::sync::Notify;

/// Which output stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 0,
    Stderr = 1,
}

impl Stream {
    pub fn event_type(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Default)]
struct State {
    bufs: [Vec<u8>; 2],
    truncated: [bool; 2],
    exceeded: bool,
}

/// Output of one run, capped at `limit` bytes for both streams together.
pub struct Capture {
    limit: usize,
    state: Mutex<State>,
    notify: Notify,
}

impl Capture {
    pub fn new(limit: u64) -> Self {
        Capture {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            state: Mutex::new(State::default()),
            notify: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends what fits in the budget. Returns `false` once the budget is exceeded: the
    /// program must then be stopped (`killed_by: output`).
    pub fn write(&self, stream: Stream, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return !self.lock().exceeded;
        }
        let ok = {
            let mut s = self.lock();
            let used = s.bufs[0].len() + s.bufs[1].len();
            let room = self.limit.saturating_sub(used);
            let take = room.min(bytes.len());
            s.bufs[stream as usize].extend_from_slice(&bytes[..take]);
            if take < bytes.len() {
                s.truncated[stream as usize] = true;
                s.exceeded = true;
            }
            !s.exceeded
        };
        self.notify.notify_one();
        ok
    }

    /// Whether the program wrote more than the budget.
    pub fn exceeded(&self) -> bool {
        self.lock().exceeded
    }

    /// Bytes written since `offsets` (which are advanced), per stream.
    pub fn take_new(&self, offsets: &mut [usize; 2]) -> [Vec<u8>; 2] {
        let s = self.lock();
        let mut out: [Vec<u8>; 2] = Default::default();
        for i in 0..2 {
            if s.bufs[i].len() > offsets[i] {
                out[i] = s.bufs[i][offsets[i]..].to_vec();
                offsets[i] = s.bufs[i].len();
            }
        }
        out
    }

    /// Waits until something was written (or returns at once if it was since the last wait).
    pub async fn changed(&self) {
        self.notify.notified().await
    }

    /// Wakes a waiter of [`Capture::changed`] (e.g. at the end of the run).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Everything captured, as text with invalid UTF-8 replaced.
    pub fn finish(&self) -> (String, String, Truncated) {
        let s = self.lock();
        (
            String::from_utf8_lossy(&s.bufs[0]).into_owned(),
            String::from_utf8_lossy(&s.bufs[1]).into_owned(),
            Truncated {
                stdout: s.truncated[0],
                stderr: s.truncated[1],
            },
        )
    }
}

/// Decodes a byte stream into text chunk by chunk: a character split across two chunks is
/// kept until it is complete; invalid bytes become U+FFFD.
#[derive(Default)]
pub struct Utf8Chunks {
    carry: Vec<u8>,
}

impl Utf8Chunks {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        let mut out = String::with_capacity(buf.len());
        let mut rest: &[u8] = &buf;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &bad[n..];
                        }
                        None => {
                            // an incomplete character at the end: wait for the rest
                            self.carry = bad.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        out
    }

    /// The end of the stream: an incomplete trailing character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        if self.carry.is_empty() {
            String::new()
        } else {
            self.carry.clear();
            "\u{FFFD}".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_shared_and_truncates() {
        let c = Capture::new(10);
        assert!(c.write(Stream::Stdout, b"hello"));
        assert!(c.write(Stream::Stderr, b"abc"));
        assert!(!c.write(Stream::Stdout, b"world"));
        let (out, err, t) = c.finish();
        assert_eq!((out.as_str(), err.as_str()), ("hellowo", "abc"));
        assert_eq!(
            t,
            Truncated {
                stdout: true,
                stderr: false
            }
        );
        assert!(c.exceeded());
    }

    #[test]
    fn take_new_advances() {
        let c = Capture::new(100);
        let mut off = [0, 0];
        c.write(Stream::Stdout, b"a");
        assert_eq!(c.take_new(&mut off), [b"a".to_vec(), Vec::new()]);
        c.write(Stream::Stdout, b"b");
        c.write(Stream::Stderr, b"c");
        assert_eq!(c.take_new(&mut off), [b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(c.take_new(&mut off), [Vec::<u8>::new(), vec![]]);
    }

    #[test]
    fn utf8_split_characters_and_invalid_bytes() {
        let mut d = Utf8Chunks::default();
        let e = "é€😀".as_bytes();
        let mut s = String::new();
        for b in e {
            s.push_str(&d.push(std::slice::from_ref(b)));
        }
        assert_eq!(s, "é€😀");
        assert_eq!(d.push(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(d.push(b"\xe2\x82"), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
