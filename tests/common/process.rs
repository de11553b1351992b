//! `cllm serve` as a separate process, the way operators run it: its log captured to a file,
//! its address read from the log, killed when dropped.

use super::{cllm, repo_root};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

pub struct ServeProcess {
    child: Child,
    /// `host:port` it listens on.
    pub addr: String,
    log_path: PathBuf,
}

impl ServeProcess {
    /// Starts `cllm serve --model models/stories260K --port 0 ARGS...` with its log in
    /// `dir/NAME.log`, and waits until it listens.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> ServeProcess {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = cllm()
            .args(["serve", "--model", "models/stories260K", "--port", "0"])
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
            assert!(Instant::now() < deadline, "{name} never listened:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        };
        process
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
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
