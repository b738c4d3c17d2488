//! The wasm tier's disk cap: a run's working directory measured while it runs (WASI writes
//! go straight to the worker's disk).

use std::path::Path;
use std::time::Duration;

/// Bytes a program's directory may hold on the wasm tier (the gVisor tier's `/work`: 64 MiB),
/// and files: WASI writes go straight to the host's disk, which one program would otherwise
/// fill for every tenant of the worker.
pub const DISK_BYTES: u64 = 64 << 20;
pub const DISK_FILES: u64 = 4096;
/// How often the directory is measured (what a program writes in between is its overshoot).
const DISK_CHECK: Duration = Duration::from_millis(50);

/// Resolves once `dir` holds more than [`DISK_BYTES`] or [`DISK_FILES`].
pub(super) async fn filled(dir: &Path) {
    loop {
        tokio::time::sleep(DISK_CHECK).await;
        // measured on another thread: not on the guest's CPU clock, nor holding it up
        let d = dir.to_path_buf();
        let Ok((bytes, files)) = tokio::task::spawn_blocking(move || usage(&d)).await else {
            continue;
        };
        if bytes > DISK_BYTES || files > DISK_FILES {
            return;
        }
    }
}

/// Deepest directory nesting a run may make (each level walked holds a descriptor).
const DISK_DEPTH: usize = 128;

/// Bytes and entries a run holds in `dir`: the tree under it, walked relative to directory
/// descriptors (a path past the kernel's 4,096-byte limit cannot hide a subtree) without
/// following symbolic links, plus files still open but no longer named (deleted after being
/// opened, they take disk as long as they are written). Stops counting past the caps; a tree
/// deeper than [`DISK_DEPTH`] counts as over them.
fn usage(dir: &Path) -> (u64, u64) {
    let mut total = (0u64, 0u64);
    let over = |(bytes, files): (u64, u64)| bytes > DISK_BYTES || files > DISK_FILES;
    if let Ok(fd) = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        if !walk(&fd, 0, &mut total) {
            return (DISK_BYTES + 1, total.1);
        }
    }
    if !over(total) {
        total.0 = total.0.saturating_add(unlinked_open_bytes(dir));
    }
    total
}

/// Adds the entries under the directory `fd` to `total`; false when the tree is deeper than
/// [`DISK_DEPTH`]. Stops early once past the caps.
fn walk(fd: &std::os::fd::OwnedFd, depth: usize, total: &mut (u64, u64)) -> bool {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    if depth > DISK_DEPTH {
        return false;
    }
    let Ok(entries) = rustix::fs::Dir::read_from(fd) else {
        return true;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        total.1 += 1;
        let Ok(st) = rustix::fs::statat(fd, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            if let Ok(sub) = rustix::fs::openat(fd, name, flags, Mode::empty()) {
                if !walk(&sub, depth + 1, total) {
                    return false;
                }
            }
        } else {
            total.0 = total.0.saturating_add(st.st_size.max(0) as u64);
        }
        if total.0 > DISK_BYTES || total.1 > DISK_FILES {
            return true;
        }
    }
    true
}

/// Bytes of the files under `dir` this process holds open that have no name any more (the
/// guest's descriptors are this process's: `/proc/self/fd`).
fn unlinked_open_bytes(dir: &Path) -> u64 {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    let prefix = dir.as_os_str().as_encoded_bytes();
    let mut bytes = 0u64;
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let t = target.as_os_str().as_encoded_bytes();
        if t.starts_with(prefix) && t.ends_with(b" (deleted)") {
            if let Ok(meta) = std::fs::metadata(fd.path()) {
                if meta.is_file() {
                    bytes = bytes.saturating_add(meta.len());
                }
            }
        }
    }
    bytes
}
