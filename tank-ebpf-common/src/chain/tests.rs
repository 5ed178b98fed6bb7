//! Tests of the chain: writer, segments, verification.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::*;

fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (mut w, rec) = ChainWriter::open(&path).unwrap();
    assert_eq!(rec, None);
    for i in 0..n {
        assert_eq!(w.append(&json!({"i": i, "note": "x"})).unwrap(), i + 1);
    }
    w.sync().unwrap();
    (dir, path)
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
fn intact_log_verifies_with_the_chain_fields_in_place() {
    let (_d, path) = log_with(5);
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.records, 5);
    assert_eq!(report.anchor.unwrap().seq, 5);
    let first: serde_json::Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(first["metadata"]["sequence"], 1);
    assert_eq!(first["unmapped"]["prev"], Hash::GENESIS.to_string());
    assert_eq!(first["note"], "x");
}

#[test]
fn reopening_continues_the_chain() {
    let (_d, path) = log_with(3);
    let (mut w, _) = ChainWriter::open(&path).unwrap();
    assert_eq!(w.append(&json!({"more": true})).unwrap(), 4);
    w.sync().unwrap();
    assert!(verify(&path).unwrap().is_intact());
}

#[test]
fn an_edit_is_caught() {
    let (_d, path) = log_with(4);
    let mut l = lines(&path);
    l[1] = l[1].replace("\"note\":\"x\"", "\"note\":\"y\"");
    write_lines(&path, &l);
    assert_eq!(
        verify(&path).unwrap().problems,
        vec![Problem::HashMismatch { line: 3 }]
    );
}

#[test]
fn an_edit_of_the_last_record_is_caught_by_the_anchor() {
    let (_d, path) = log_with(4);
    let mut l = lines(&path);
    l[3] = l[3].replace("\"note\":\"x\"", "\"note\":\"y\"");
    write_lines(&path, &l);
    assert_eq!(
        verify(&path).unwrap().problems,
        vec![Problem::AnchorMismatch { seq: 4 }]
    );
}

#[test]
fn a_deletion_is_caught() {
    let (_d, path) = log_with(4);
    let mut l = lines(&path);
    l.remove(1);
    write_lines(&path, &l);
    let problems = verify(&path).unwrap().problems;
    assert!(
        problems.contains(&Problem::SeqGap {
            line: 2,
            expected: 2,
            found: 3
        }),
        "{problems:?}"
    );
    assert!(
        problems.contains(&Problem::HashMismatch { line: 2 }),
        "{problems:?}"
    );
}

#[test]
fn a_reordering_is_caught() {
    let (_d, path) = log_with(4);
    let mut l = lines(&path);
    l.swap(1, 2);
    write_lines(&path, &l);
    let problems = verify(&path).unwrap().problems;
    assert!(
        problems.contains(&Problem::SeqGap {
            line: 2,
            expected: 2,
            found: 3
        }),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .filter(|p| matches!(p, Problem::HashMismatch { .. }))
            .count()
            >= 2
    );
}

#[test]
fn truncation_of_whole_records_is_caught_by_the_anchor() {
    let (_d, path) = log_with(4);
    let mut l = lines(&path);
    l.truncate(2);
    write_lines(&path, &l);
    assert_eq!(
        verify(&path).unwrap().problems,
        vec![Problem::Truncated {
            anchored: 4,
            last: 2
        }]
    );
}

#[test]
fn a_partial_last_line_is_reported_and_never_accepted() {
    let (_d, path) = log_with(3);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"{\"seq\":4,\"prev\":\"ab").unwrap();
    drop(f);
    assert_eq!(
        verify(&path).unwrap().problems,
        vec![Problem::PartialLastLine { line: 4 }]
    );

    // A writer restarting after the crash cuts the fragment (never synced) and continues
    // from seq 3: the log verifies again.
    let (mut w, rec) = ChainWriter::open(&path).unwrap();
    assert_eq!(rec, Some(Recovery { partial_bytes: 19 }));
    assert_eq!(w.append(&json!({"after": "crash"})).unwrap(), 4);
    w.sync().unwrap();
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.records, 4);
}

#[test]
fn verify_command_reports_and_exits_by_the_one_rule() {
    let (dir, path) = log_with(3);
    let run = |path: &Path, json| {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = verify_command("prog", &[path.to_owned()], json, &mut out, &mut err).unwrap();
        let text = |b| String::from_utf8(b).unwrap();
        (code, text(out), text(err))
    };
    let (code, out, err) = run(&path, false);
    let intact = format!(
        "{}: intact: 3 records, last seq 3 (anchored at seq 3)\n",
        path.display()
    );
    assert_eq!((code, out, err), (0, intact, String::new()));
    let (code, out, _) = run(&path, true);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((code, report["records"].as_u64()), (0, Some(3)));

    let mut l = lines(&path);
    l.remove(1);
    write_lines(&path, &l);
    let (code, out, _) = run(&path, false);
    assert_eq!(code, 1);
    assert!(
        out.ends_with(&format!(
            "{}: NOT intact: 2 problem(s) in 2 records\n",
            path.display()
        )),
        "{out}"
    );

    let missing = dir.path().join("missing.jsonl");
    let (code, out, err) = run(&missing, false);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(
        err.starts_with("prog: cannot read audit log `") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn a_second_writer_is_refused() {
    let (_d, path) = log_with(1);
    let (_w, _) = ChainWriter::open(&path).unwrap();
    assert!(is_held(&path).unwrap());
    assert!(matches!(
        ChainWriter::open(&path),
        Err(ChainError::Locked { .. })
    ));
}

#[test]
fn reserved_fields_and_non_objects_are_refused() {
    let (_d, path) = log_with(0);
    let (mut w, _) = ChainWriter::open(&path).unwrap();
    for bad in [
        json!({"metadata": {"sequence": 9}}),
        json!({"unmapped": {"prev": "x"}}),
        json!({"unmapped": 1}),
        json!({"unmapped": {"segment": {}}}),
        json!({"unmapped": {"opens": true}}),
        json!({"unmapped": {"closes": 1}}),
    ] {
        assert!(
            matches!(w.append(&bad), Err(ChainError::BadRecord)),
            "{bad}"
        );
    }
    assert!(matches!(
        w.append(&json!([1, 2])),
        Err(ChainError::BadRecord)
    ));
    assert_eq!(w.append(&json!({})).unwrap(), 1);
}

fn rotating(keep: Option<usize>, compress: bool) -> Options {
    Options {
        reserve_bytes: 1024,
        rotation: Rotation {
            max_bytes: Some(400),
            keep_segments: keep,
            compress,
            ..Rotation::default()
        },
    }
}

/// A log of `n` records rotated whenever the active file passes 400 bytes.
fn rotated_log(n: u64, opts: Options) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (mut w, _) = ChainWriter::open_with(&path, opts).unwrap();
    for i in 0..n {
        if w.rotation_due() {
            w.rotate(&json!({"new": "segment"})).unwrap();
        }
        w.append(&json!({"i": i, "note": "some words to fill the line"}))
            .unwrap();
    }
    w.sync().unwrap();
    (dir, path)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with("audit.jsonl.0")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_rotated_log_verifies_whole_by_its_name_its_directory_or_its_files() {
    let (dir, path) = rotated_log(30, rotating(None, false));
    let segments = segment_files(dir.path());
    assert!(segments.len() >= 5, "{segments:?}");
    for given in [
        vec![path.clone()],
        vec![dir.path().to_owned()],
        // A shell glob: the active file sorts first, the series is still put in order.
        std::iter::once(path.clone())
            .chain(segments.clone())
            .collect(),
    ] {
        let (report, records) = read_series(&given).unwrap();
        assert!(report.is_intact(), "{given:?}: {:?}", report.problems);
        assert_eq!(records.len() as u64, report.head.seq);
        assert_eq!(report.segments.len(), segments.len() + 1);
        assert_eq!(report.anchor.as_ref().unwrap().seq, report.head.seq);
    }
    // Each segment after the first begins with its link to the one before.
    let (_, records) = read(&path).unwrap();
    let first_link = records
        .iter()
        .find(|r| r.value["unmapped"].get("segment").is_some())
        .unwrap();
    let link: SegmentLink =
        serde_json::from_value(first_link.value["unmapped"]["segment"].clone()).unwrap();
    assert_eq!(
        link.previous.as_deref(),
        Some("audit.jsonl.00000000000000000001")
    );
    assert_eq!(link.previous_last_seq + 1, segment_first_seq(&segments[1]));
    // The active file alone cannot vouch for what came before it.
    let (report, _) = read_series(std::slice::from_ref(segments.last().unwrap())).unwrap();
    assert!(
        matches!(report.problems[..], [Problem::MissingStart { .. }]),
        "{:?}",
        report.problems
    );
}

fn segment_first_seq(p: &Path) -> u64 {
    let n = p.file_name().unwrap().to_str().unwrap();
    n.trim_start_matches("audit.jsonl.")
        .trim_end_matches(".zst")
        .parse()
        .unwrap()
}

#[test]
fn a_missing_segment_is_caught() {
    let (dir, path) = rotated_log(30, rotating(None, false));
    let segments = segment_files(dir.path());
    std::fs::remove_file(&segments[2]).unwrap();
    let report = verify(&path).unwrap();
    assert!(
        matches!(&report.problems[..], [Problem::MissingSegment { previous: Some(p), .. }] if *p == name(&segments[2])),
        "{:?}",
        report.problems
    );
    // So is a missing first segment: nothing says it was removed on purpose.
    std::fs::remove_file(&segments[0]).unwrap();
    let problems = verify(&path).unwrap().problems;
    assert!(
        matches!(problems[0], Problem::MissingStart { first_seq, .. } if first_seq == segment_first_seq(&segments[1])),
        "{problems:?}"
    );
}

fn name(p: &Path) -> String {
    p.file_name().unwrap().to_str().unwrap().to_owned()
}

#[test]
fn reordered_segments_are_caught() {
    let (dir, path) = rotated_log(30, rotating(None, false));
    let segments = segment_files(dir.path());
    // Swap the contents of two segments under their names.
    let (a, b) = (&segments[1], &segments[2]);
    let (ta, tb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    std::fs::write(a, tb).unwrap();
    std::fs::write(b, ta).unwrap();
    let problems = verify(&path).unwrap().problems;
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::SegmentOutOfOrder { file, .. } if *file == name(b))),
        "{problems:?}"
    );
    // Given explicitly in the wrong order (names that are not tank's): caught too.
    let copies: Vec<PathBuf> = [2, 1]
        .iter()
        .map(|&i| {
            let c = dir.path().join(format!("copy{i}"));
            std::fs::copy(&segments[i], &c).unwrap();
            c
        })
        .collect();
    let (report, _) = read_series(&copies).unwrap();
    assert!(!report.is_intact());
}

#[test]
fn a_truncated_segment_is_caught() {
    let (dir, path) = rotated_log(30, rotating(None, false));
    let segments = segment_files(dir.path());
    let text = std::fs::read_to_string(&segments[1]).unwrap();
    let kept: String = text.split_inclusive('\n').take(1).collect();
    std::fs::write(&segments[1], kept).unwrap();
    let problems = verify(&path).unwrap().problems;
    assert!(
        matches!(&problems[..], [Problem::SegmentTruncated { file, .. }] if *file == name(&segments[1])),
        "{problems:?}"
    );
}

#[test]
fn a_replaced_segment_is_caught() {
    let (dir, path) = rotated_log(30, rotating(None, false));
    let segments = segment_files(dir.path());
    // A forger rewrites segment 2 with a valid chain of their own from the same seq.
    let first = segment_first_seq(&segments[2]);
    let forged = dir.path().join("forged.jsonl");
    {
        let (mut w, _) = ChainWriter::open(&forged).unwrap();
        // Seq 1.. up to first-1 so the next seq matches, then the forged records.
        for _ in 1..first {
            w.append(&json!({"x": 1})).unwrap();
        }
        let mut lines = Vec::new();
        for _ in 0..3 {
            w.append(&json!({"forged": true})).unwrap();
        }
        w.sync().unwrap();
        let text = std::fs::read_to_string(&forged).unwrap();
        lines.extend(
            text.lines()
                .skip((first - 1) as usize)
                .map(|l| format!("{l}\n")),
        );
        std::fs::write(&segments[2], lines.concat()).unwrap();
    }
    std::fs::remove_file(&forged).unwrap();
    std::fs::remove_file(anchor_path(&forged)).unwrap();
    let problems = verify(&path).unwrap().problems;
    assert!(
        problems
            .iter()
            .any(|p| matches!(p, Problem::SegmentReplaced { file } if *file == name(&segments[2]))),
        "{problems:?}"
    );
}

#[test]
fn retention_deletes_old_segments_and_says_so_in_the_chain() {
    let (dir, path) = rotated_log(40, rotating(Some(2), false));
    let segments = segment_files(dir.path());
    assert_eq!(segments.len(), 2, "{segments:?}");
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(
        report.segments[0].first_seq,
        segment_first_seq(&segments[0])
    );
    // Deleting one more by hand is not retention.
    std::fs::remove_file(&segments[0]).unwrap();
    let problems = verify(&path).unwrap().problems;
    assert!(
        matches!(problems[..], [Problem::MissingStart { .. }]),
        "{problems:?}"
    );
}

#[test]
fn rotated_segments_are_compressed_and_still_verify() {
    let (dir, path) = rotated_log(30, rotating(None, true));
    // Compression runs in the background; wait for it, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let all_zst = || {
        segment_files(dir.path())
            .iter()
            .all(|p| p.extension().is_some_and(|e| e == "zst"))
    };
    while !all_zst() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(all_zst(), "{:?}", segment_files(dir.path()));
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert!(report.segments.len() >= 5);
}

#[test]
fn a_restart_continues_the_chain_and_its_segment() {
    let (dir, path) = rotated_log(12, rotating(None, false));
    let before = segment_files(dir.path()).len();
    let (mut w, _) = ChainWriter::open_with(&path, rotating(None, false)).unwrap();
    let seq = w.head().seq;
    assert_eq!(w.append(&json!({"after": "restart"})).unwrap(), seq + 1);
    w.sync().unwrap();
    drop(w);
    // A rotation cut short after renaming the active file: the chain goes on from the segment.
    let seg = dir.path().join(format!("audit.jsonl.{:020}", seq + 100));
    std::fs::rename(&path, &seg).unwrap();
    let (mut w, _) = ChainWriter::open_with(&path, rotating(None, false)).unwrap();
    assert_eq!(w.head().seq, seq + 1);
    w.append(&json!({"after": "cut rotation"})).unwrap();
    w.sync().unwrap();
    assert_eq!(segment_files(dir.path()).len(), before + 1);
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
}

#[test]
fn reopen_after_logrotate_moved_the_log_starts_a_linked_file() {
    let (_d, path) = log_with(3);
    let (mut w, _) = ChainWriter::open(&path).unwrap();
    assert!(
        !w.reopen(&json!({"reopened": true})).unwrap(),
        "nothing moved"
    );
    let moved = path.with_extension("jsonl.1");
    std::fs::rename(&path, &moved).unwrap();
    w.append(&json!({"into": "moved file"})).unwrap();
    assert!(w.reopen(&json!({"reopened": true})).unwrap());
    w.append(&json!({"into": "new file"})).unwrap();
    w.sync().unwrap();
    let first: serde_json::Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(first["metadata"]["sequence"], 5);
    let link = &first["unmapped"]["segment"];
    assert!(
        link["previous"].is_null() && link["previous_last_seq"] == 4,
        "{first}"
    );
    let (report, _) = read_series(&[moved.clone(), path.clone()]).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(report.head.seq, 6);
    // Without the moved file the gap shows.
    let (report, _) = read_series(std::slice::from_ref(&path)).unwrap();
    assert!(matches!(
        report.problems[0],
        Problem::MissingStart { first_seq: 5, .. }
    ));
}

#[test]
fn spans_opened_and_never_closed_are_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (mut w, _) = ChainWriter::open(&path).unwrap();
    let a = w.append_opening(&json!({"tunnel": "a"}), 0).unwrap();
    let b = w.append_opening(&json!({"tunnel": "b"}), 0).unwrap();
    w.append_closing(&json!({"tunnel": "a", "bytes": 10}), a, 0)
        .unwrap();
    w.sync().unwrap();
    let report = verify(&path).unwrap();
    assert!(report.is_intact(), "{:?}", report.problems);
    assert_eq!(
        report.unclosed.iter().map(|o| o.seq).collect::<Vec<_>>(),
        vec![b]
    );
    let closing: serde_json::Value = serde_json::from_str(&lines(&path)[2]).unwrap();
    assert_eq!(closing["unmapped"]["closes"], a);
    let opening: serde_json::Value = serde_json::from_str(&lines(&path)[0]).unwrap();
    assert_eq!(opening["unmapped"]["opens"], true);
    // Closing twice, or closing what never opened, is a problem.
    w.append_closing(&json!({}), a, 0).unwrap();
    w.sync().unwrap();
    let problems = verify(&path).unwrap().problems;
    assert_eq!(problems, vec![Problem::UnknownClose { line: 4, closes: a }]);
}

#[test]
fn hash_parses_exactly_what_hex_decodes() {
    let h = Hash::of(b"a record");
    let text = h.to_string();
    assert_eq!(text.parse::<Hash>().unwrap(), h);
    assert_eq!(text.to_uppercase().parse::<Hash>().unwrap(), h);
    let mut out = [0u8; 32];
    for bad in [
        String::new(),
        text[..63].to_owned(),
        text[..62].to_owned(),
        format!("{text}00"),
        format!("{}g", &text[..63]),
        format!("x{}", &text[1..]),
        format!("{}é", &text[..62]),
    ] {
        assert_eq!(
            bad.parse::<Hash>().map(|h| h.0),
            hex::decode_to_slice(&bad, &mut out).map(|()| out),
            "{bad:?}"
        );
    }
}
