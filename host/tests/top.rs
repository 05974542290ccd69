//! `host top` in a real terminal (a detached tmux session of our own):
//! started before the host it watches, it says the host is unreachable;
//! once the host runs it renders the stage table, follows the rows as they
//! arrive, and quits on `q`. The last screen is saved as text and as a
//! picture: `target/top/top.txt` and `target/top/top.png` (the text drawn
//! by headless Chromium, when it is installed).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A tmux server private to this test (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux {
            socket: format!("host-top-test-{}", std::process::id()),
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket, "-f", "/dev/null"]);
        c
    }

    fn start(&self, command: &str) {
        let status = self
            .cmd()
            .args(["new-session", "-d", "-s", "top", "-x", "160", "-y", "45"])
            .arg(command)
            .status()
            .expect("tmux (apt install tmux; make test does)");
        assert!(status.success(), "tmux new-session failed");
    }

    fn screen(&self) -> Option<String> {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn keys(&self, keys: &str) {
        let _ = self.cmd().args(["send-keys", "-t", "top", keys]).status();
    }

    fn alive(&self) -> bool {
        self.cmd()
            .args(["has-session", "-t", "top"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until the screen satisfies `ready`; a failed wait prints it.
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        let mut last = String::new();
        loop {
            if let Some(screen) = self.screen() {
                if ready(&screen) {
                    return screen;
                }
                last = screen;
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "timed out waiting for {what}; the screen:\n{last}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").stderr(Stdio::null()).status();
    }
}

fn artifacts() -> PathBuf {
    let dir = repo().join("target/top");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Draws the captured screen as a picture with headless Chromium, when
/// there is one (the text capture is the artifact that always exists).
fn picture(text: &str, png: &Path, profile: &Path) {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let html = profile.with_extension("html");
    std::fs::write(
        &html,
        format!("<!doctype html><meta charset=utf-8><body style=\"margin:0;background:#111;color:#ddd\"><pre style=\"font:13px/1.25 monospace;margin:8px\">{escaped}</pre>"),
    )
    .unwrap();
    let _ = Command::new(std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into()))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1260,760",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

#[test]
fn top_renders_the_stages_follows_new_rows_and_quits_on_q() {
    let dir = scratch("top");
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    let url = fresh_db("top");
    let port = free_port();

    let tmux = Tmux::new();
    tmux.start(&format!(
        "{} top --addr 127.0.0.1:{port}",
        env!("CARGO_BIN_EXE_host")
    ));
    // No host yet: it says so, and keeps trying.
    tmux.wait_for("the unreachable notice", |s| {
        s.contains("UNREACHABLE") && s.contains("retrying")
    });

    let host = Running::new(
        host()
            .args(run_args_on(
                &plugins_dir(),
                &input,
                &url,
                &dir.join("state"),
                port,
            ))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("host.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let screen = tmux.wait_for("the stage table", |s| {
        s.contains("connected") && s.contains("transform") && s.contains("dedup")
    });
    assert!(
        screen.contains("STAGE") && screen.contains("IN/S"),
        "{screen}"
    );
    assert!(!screen.contains("UNREACHABLE"), "{screen}");

    write_csv(
        &input,
        "a.csv",
        &(0..10).map(|i| row(i + 1, 1)).collect::<Vec<_>>(),
    );
    tmux.wait_for("ten rows", |s| s.contains("written 10 "));
    write_csv(
        &input,
        "b.csv",
        &(0..15).map(|i| row(i + 1, 1)).collect::<Vec<_>>(),
    );
    let screen = tmux.wait_for("twenty-five rows", |s| s.contains("written 25 "));
    assert_eq!(count(&url, "SELECT count(*) FROM ecommerce_events"), 25);
    // The stage rows show what each stage took in.
    let transform = screen
        .lines()
        .find(|l| l.contains("transform"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        transform.split_whitespace().any(|w| w == "25"),
        "{transform}"
    );
    // `s` sorts by another column: the table title says which.
    tmux.keys("s");
    tmux.wait_for("the sort", |s| s.contains("sorted by name"));

    let out = artifacts();
    std::fs::write(out.join("top.txt"), &screen).unwrap();
    picture(&screen, &out.join("top.png"), &dir.join("profile"));

    tmux.keys("q");
    let started = Instant::now();
    while tmux.alive() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "host top did not quit on q: {}",
            tmux.screen().unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(host.terminate(), "clean exit on SIGTERM");
}
