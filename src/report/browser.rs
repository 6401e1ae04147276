//! Open a report in headless Chromium and read back what the page saw: the self-check verdict of
//! [`super::html`] and every console message.
//!
//! This is what CI runs on a generated report (Debian package `chromium`). Chromium prints console
//! messages to stderr with `--enable-logging=stderr` but tags them all `INFO:CONSOLE` whatever their
//! level, so an error cannot be told from a log line there. The report never writes to the console,
//! so **every** console message counts as a problem: an uncaught exception, a failed resource load,
//! a deprecation warning. Host resolution is mapped to nothing, so a page that tried to reach the
//! network would log a failed load instead of silently fetching.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set to a Chromium binary to use instead of searching `PATH` and `/usr/bin`.
pub const CHROMIUM_ENV: &str = "PIPE_CHROMIUM";

#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("no Chromium found (looked for ${CHROMIUM_ENV}, chromium, chromium-browser, google-chrome); install it with `apt-get install -y --no-install-recommends chromium`")]
    NotFound,
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("chromium did not finish within {0:?}")]
    Timeout(Duration),
    #[error("chromium exited with {status}; stderr:\n{stderr}")]
    Failed { status: String, stderr: String },
}

/// What the page reported.
#[derive(Debug, Clone)]
pub struct PageCheck {
    /// `data-verdict` of `#plot-check` (`ok`, `failed`, or `pending` when the script never ran);
    /// `None` when the page has no such element.
    pub verdict: Option<String>,
    /// The text of `#plot-check` (`plots-ok: 5/5`, or the list of empty plots).
    pub verdict_text: String,
    /// Console lines (`"message", source: file:///… (line)`).
    pub console: Vec<String>,
    /// The DOM after scripts ran.
    pub dom: String,
}

impl PageCheck {
    /// Everything wrong with the page; empty means it loaded silently and every plot drew.
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.console.iter().map(|c| format!("console: {c}")).collect();
        match self.verdict.as_deref() {
            Some("ok") => {}
            Some(v) => out.push(format!("plot check {v}: {}", self.verdict_text)),
            None => out.push("no #plot-check element in the page".into()),
        }
        out
    }
}

/// The Chromium binary to use, if any.
pub fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(CHROMIUM_ENV) {
        return Some(PathBuf::from(p));
    }
    let names = ["chromium", "chromium-browser", "google-chrome"];
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.push(PathBuf::from("/usr/bin"));
    dirs.iter().flat_map(|d| names.iter().map(move |n| d.join(n))).find(|p| p.is_file())
}

/// Load `html` in headless Chromium and report what the page saw.
pub fn check(html: &Path, timeout: Duration) -> Result<PageCheck, BrowserError> {
    let exe = chromium().ok_or(BrowserError::NotFound)?;
    let io = |what: &str| {
        let what = what.to_string();
        move |source| BrowserError::Io { what: what.clone(), source }
    };
    let abs = std::fs::canonicalize(html).map_err(io(&html.display().to_string()))?;
    let profile = tempfile::tempdir().map_err(io("temp profile dir"))?;
    let stdout_path = profile.path().join("dom.html");
    let stderr_path = profile.path().join("stderr.log");
    let stdout = std::fs::File::create(&stdout_path).map_err(io("dom file"))?;
    let stderr = std::fs::File::create(&stderr_path).map_err(io("stderr file"))?;
    let mut child = Command::new(&exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().join("profile").display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", abs.display()))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(io(&exe.display().to_string()))?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(io("waiting for chromium"))? {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BrowserError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let dom = std::fs::read_to_string(&stdout_path).map_err(io("dom file"))?;
    let log = std::fs::read_to_string(&stderr_path).map_err(io("stderr file"))?;
    if !status.success() || dom.trim().is_empty() {
        return Err(BrowserError::Failed { status: status.to_string(), stderr: log });
    }
    Ok(parse(dom, &log))
}

fn parse(dom: String, log: &str) -> PageCheck {
    let console = log
        .lines()
        .filter_map(|l| l.split_once(":CONSOLE").map(|(_, rest)| rest.split_once("] ").map_or(rest, |(_, m)| m)))
        .map(str::to_string)
        .collect();
    let (verdict, verdict_text) = match dom.find("id=\"plot-check\"") {
        None => (None, String::new()),
        Some(at) => {
            let tag_start = dom[..at].rfind('<').unwrap_or(at);
            let tag_end = at + dom[at..].find('>').unwrap_or(0);
            let tag = &dom[tag_start..tag_end];
            let verdict = tag
                .split_once("data-verdict=\"")
                .and_then(|(_, r)| r.split_once('"'))
                .map_or("missing", |(v, _)| v)
                .to_string();
            let text = dom[tag_end + 1..].split_once("</").map_or("", |(t, _)| t).to_string();
            (Some(verdict), text)
        }
    };
    PageCheck { verdict, verdict_text, console, dom }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_verdict_and_console_lines() {
        let dom = "<p data-verdict=\"failed\" id=\"plot-check\">plots-failed: roc: nothing drawn</p>".to_string();
        let log = "[1:1:1126/1:ERROR:dbus/bus.cc:405] Failed to connect to the bus\n\
                   [1:1:1126/1:INFO:CONSOLE:4] \"Uncaught ReferenceError: f is not defined\", source: file:///r.html (4)\n";
        let c = parse(dom, log);
        assert_eq!(c.verdict.as_deref(), Some("failed"));
        assert_eq!(c.verdict_text, "plots-failed: roc: nothing drawn");
        assert_eq!(c.console, vec!["\"Uncaught ReferenceError: f is not defined\", source: file:///r.html (4)"]);
        assert_eq!(c.problems().len(), 2);
        let clean = parse("<p id=\"plot-check\" data-verdict=\"ok\">plots-ok: 2/2</p>".into(), "");
        assert!(clean.problems().is_empty(), "{:?}", clean.problems());
        assert_eq!(clean.verdict_text, "plots-ok: 2/2");
        assert_eq!(parse("<p>nothing</p>".into(), "").problems(), vec!["no #plot-check element in the page"]);
    }
}
