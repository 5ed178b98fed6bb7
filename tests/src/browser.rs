//! Headless Chromium (Debian `chromium`) opening a local HTML file: a screenshot, and the text
//! the browser laid out, read back from its PDF print with `pdftotext` (Debian
//! `poppler-utils`). Both come from the rendered page, not from the HTML source.
//!
//! Chromium runs with a fresh profile, no background networking and a host resolver that
//! resolves nothing, so it sends no DNS query and reaches nothing; it is stopped by its PID if
//! it does not finish in time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs headless Chromium on `page` with `args` (e.g. `--screenshot=FILE`), bounded in time.
fn chromium(page: &Path, args: &[String]) {
    let profile = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run chromium (Debian package chromium: cargo xtask setup)");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait().expect("poll chromium") {
            let out = child.wait_with_output().expect("chromium output");
            assert!(
                status.success(),
                "chromium {args:?} failed ({status}): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Takes a `width`x`height` screenshot of `page` into `png`.
pub fn screenshot(page: &Path, png: &Path, width: u32, height: u32) {
    chromium(
        page,
        &[
            format!("--screenshot={}", png.display()),
            format!("--window-size={width},{height}"),
        ],
    );
    let bytes = std::fs::read(png).expect("chromium wrote no screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "{} is not a PNG of a rendered page ({} bytes)",
        png.display(),
        bytes.len()
    );
}

/// The text Chromium renders of `page`: printed to PDF, read back with `pdftotext`.
pub fn rendered_text(page: &Path) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let pdf = dir.path().join("page.pdf");
    chromium(
        page,
        &[
            format!("--print-to-pdf={}", pdf.display()),
            "--no-pdf-header-footer".to_owned(),
        ],
    );
    let out = Command::new("pdftotext")
        .args(["-layout"])
        .arg(&pdf)
        .arg("-")
        .output()
        .expect("run pdftotext (Debian package poppler-utils: cargo xtask setup)");
    assert!(
        out.status.success(),
        "pdftotext: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
