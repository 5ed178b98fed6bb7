//! Validation of records against the official OCSF JSON Schema, for the writers' tests.
//!
//! The schema of each class comes from PyPI `ocsf-json-schema` (which packages OCSF's own
//! schema and generates JSON Schema from it) and the check from PyPI `jsonschema`: real
//! implementations, not a copy of OCSF's rules. `cargo xtask setup` installs both, at the
//! versions it pins, into [`PYTHON_PACKAGES_DIR`] (or the directory `TANK_OCSF_PYTHONPATH`
//! names). The script is `validate.py` beside this file.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Where `cargo xtask setup` installs the validator's Python packages: `target/ocsf-python`
/// in this workspace.
pub const PYTHON_PACKAGES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/ocsf-python");

const SCRIPT: &str = include_str!("validate.py");

/// Checks each record (a whole chained line, parsed) against the OCSF schema of its class at
/// its `metadata.version` with its `metadata.profiles`. `Err` lists every violation, one line
/// each (`line N` is the record's 1-based index in `records`).
///
/// # Panics
/// When the validator cannot run (no `python3`, packages missing): a test that cannot
/// validate must fail loudly, never pass.
pub fn check<'a>(records: impl IntoIterator<Item = &'a serde_json::Value>) -> Result<(), String> {
    let dir = std::env::var_os("TANK_OCSF_PYTHONPATH")
        .map_or_else(|| PathBuf::from(PYTHON_PACKAGES_DIR), PathBuf::from);
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .env("PYTHONPATH", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run python3 for the OCSF validator: run `cargo xtask setup`");
    let mut input = Vec::new();
    for r in records {
        serde_json::to_writer(&mut input, r).expect("a Value serializes");
        input.push(b'\n');
    }
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .expect("wait for the OCSF validator");
    writer
        .join()
        .expect("writer thread")
        .expect("feed the OCSF validator");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match out.status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(text(&out.stdout)),
        _ => panic!(
            "the OCSF validator could not run (packages in {}): {}{}",
            dir.display(),
            text(&out.stderr),
            text(&out.stdout)
        ),
    }
}
