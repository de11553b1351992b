//! `cllm serve` as a separate process, the way operators run it: its log captured to a file,
//! its address read from the log, killed when dropped.

use super::{cllm, repo_root};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

pub struct ServeProcess {
    child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    log_path: PathBuf,
}

impl ServeProcess {
    /// Starts `cllm serve --port 0 ARGS...` (with `--model models/stories260K` unless ARGS
    /// name a model) with its log in `dir/NAME.log`, and waits until it listens.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> ServeProcess {
        Self::spawn(dir, name, args, cllm())
    }

    /// As [`ServeProcess::start`], with every file the process writes limited to `kib` KiB
    /// and SIGXFSZ ignored: a write past the limit fails (EFBIG), as it would on a full disk.
    pub fn start_with_file_limit(dir: &Path, name: &str, args: &[&str], kib: u64) -> ServeProcess {
        let mut command = std::process::Command::new("bash");
        command.args([
            "-c",
            &format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""),
            env!("CARGO_BIN_EXE_cllm"),
        ]);
        Self::spawn(dir, name, args, command)
    }

    fn spawn(dir: &Path, name: &str, args: &[&str], mut command: Command) -> ServeProcess {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        command.args(["serve", "--port", "0"]);
        if !args.contains(&"--model") {
            command.args(["--model", "models/stories260K"]);
        }
        let child = command
            .args(args)
            .current_dir(repo_root())
            .stderr(log)
            .spawn()
            .expect("cllm serve starts");
        let mut process = ServeProcess {
            child,
            addr: String::new(),
            log_path,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        process.addr = loop {
            let text = process.log();
            if let Some(rest) = text.split("listening on ").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
            let exited = process.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{name} never listened (exit: {exited:?}):\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit; its exit status, or
    /// `None` if it was still running (it is killed on drop then).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
