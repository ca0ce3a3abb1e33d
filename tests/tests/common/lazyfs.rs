//! A directory on a filesystem that forgets what was not synced
//! (`tests/lazyfs/lazyfs.py`, over FUSE): [`LazyFs::cut`] drops every
//! write no fsync or fdatasync has made durable, as a power cut drops the
//! page cache. A process killed -9 before the cut is a machine that lost
//! its power.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub struct LazyFs {
    mount: PathBuf,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl LazyFs {
    /// Mounts `backing` (created) at `mount` (created) and waits until it serves.
    pub fn mount(backing: &Path, mount: &Path) -> LazyFs {
        std::fs::create_dir_all(backing).expect("backing directory");
        std::fs::create_dir_all(mount).expect("mount point");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("lazyfs/lazyfs.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(backing)
            .arg(mount)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs tests/lazyfs/lazyfs.py");
        let stdin = child.stdin.take().expect("stdin");
        let lines = read_lines(child.stdout.take().expect("stdout"));
        let fs = LazyFs {
            mount: mount.to_owned(),
            child,
            stdin,
            lines,
        };
        assert_eq!(
            fs.line(),
            "ready",
            "lazyfs did not mount {} (fusepy, libfuse2 and /dev/fuse needed)",
            mount.display()
        );
        fs
    }

    /// Drops every write not synced; answers how many bytes (whole pages) went.
    pub fn cut(&mut self) -> u64 {
        self.stdin
            .write_all(b"cut\n")
            .expect("lazyfs takes commands");
        self.stdin.flush().expect("lazyfs takes commands");
        let line = self.line();
        line.strip_prefix("cut ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("lazyfs answered {line:?} to a cut"))
    }

    fn line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(30))
            .expect("lazyfs answers within 30 s")
    }
}

fn read_lines(out: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        // Unmounting ends the filesystem's process.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
