//! A working directory one process owns while it lives (an `flock` on a file in it): workers
//! on one host that share the configured directory each take a part of their own (the
//! directory itself, else `w1`, `w2`, ...), and a worker that starts after one was killed takes
//! its part over and may clear what it left, knowing that no live process uses it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Most processes that may share one configured directory.
const MAX_OWNERS: usize = 256;

/// A directory this process holds alone; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct OwnedDir {
    path: PathBuf,
    _lock: File,
}

impl OwnedDir {
    /// The first of `base`, `base/w1`, `base/w2`... that no live process holds.
    pub fn claim(base: &Path) -> anyhow::Result<OwnedDir> {
        for i in 0..MAX_OWNERS {
            let path = match i {
                0 => base.to_path_buf(),
                i => base.join(format!("w{i}")),
            };
            std::fs::create_dir_all(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            let lock = path.join(".owner.lock");
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock)
                .with_context(|| format!("opening {}", lock.display()))?;
            // SAFETY: flock on a descriptor we own; LOCK_NB: never waits
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(OwnedDir { path, _lock: f });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e).with_context(|| format!("locking {}", lock.display()));
            }
        }
        bail!("more than {MAX_OWNERS} processes share {}", base.display())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_holder_gets_its_own_part_and_a_released_one_is_taken_again() {
        let base = std::env::temp_dir().join(format!("sy-owned-{}", uuid::Uuid::new_v4()));
        let a = OwnedDir::claim(&base).unwrap();
        let b = OwnedDir::claim(&base).unwrap();
        assert_eq!(a.path(), base);
        assert_eq!(b.path(), base.join("w1"));
        drop(a);
        let c = OwnedDir::claim(&base).unwrap();
        assert_eq!(c.path(), base, "a released part is taken over");
        drop((b, c));
        let _ = std::fs::remove_dir_all(&base);
    }
}
