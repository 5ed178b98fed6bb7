//! Property tests of the request parser, the target canonicaliser and the chunked-body
//! scanner: no input panics; valid requests parse to what was sent; the head forwarded to
//! an origin is well-formed and free of proxy headers; a chunked body's end is found
//! exactly however the stream is split.

use egress_proxy::http::{parse_request, BodyKind, ChunkedScanner, Request};
use egress_proxy::target::{canonical_host, parse_authority, Host};
use proptest::prelude::*;

fn label() -> impl Strategy<Value = String> {
    // No "--": a label like `xn--s1` is (rightly) refused as invalid punycode.
    "[a-z](-?[a-z0-9]){0,12}"
}

fn domain() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..5).prop_map(|l| format!("{}.test", l.join(".")))
}

fn token_value() -> impl Strategy<Value = String> {
    "[ -~&&[^\r\n]]{0,40}".prop_map(|s| s.trim().to_owned())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse_request(&bytes);
        let mut s = ChunkedScanner::default();
        let _ = s.feed(&bytes);
    }

    #[test]
    fn request_like_input_never_panics(
        method in "(CONNECT|GET|POST|[A-Z]{1,8})",
        target in "[ -~]{0,80}",
        headers in prop::collection::vec(("[A-Za-z-]{1,20}", "[ -~]{0,40}"), 0..8),
    ) {
        let mut req = format!("{method} {target} HTTP/1.1\r\n");
        for (k, v) in &headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        if let Ok(Some((r, len))) = parse_request(req.as_bytes()) {
            prop_assert_eq!(len, req.len());
            // Whatever was accepted names a canonical target.
            let t = r.target();
            prop_assert!(t.port != 0);
            if let Host::Name(n) = &t.host {
                prop_assert_eq!(canonical_host(n).unwrap(), Host::Name(n.clone()));
            }
        }
    }

    #[test]
    fn connect_requests_parse_to_the_canonical_target(
        host in domain(), port in 1u16.., upper in any::<bool>(), dot in any::<bool>(),
        split in 0usize..200,
    ) {
        let spelled = match (upper, dot) {
            (true, true) => format!("{}.", host.to_uppercase()),
            (true, false) => host.to_uppercase(),
            (false, true) => format!("{host}."),
            (false, false) => host.clone(),
        };
        let req = format!("CONNECT {spelled}:{port} HTTP/1.1\r\nHost: {spelled}:{port}\r\n\r\n");
        // Any prefix is incomplete, never an error.
        let cut = split.min(req.len() - 1);
        prop_assert_eq!(parse_request(&req.as_bytes()[..cut]), Ok(None));
        let (r, len) = parse_request(req.as_bytes()).unwrap().unwrap();
        prop_assert_eq!(len, req.len());
        prop_assert_eq!(r, Request::Connect { target: parse_authority(&format!("{host}:{port}"), None).unwrap() });
    }

    #[test]
    fn normal_form_is_stable_and_never_climbs(raw in "(/(\\.|\\.\\.|%2[eEfF]|%7[0-9]|[a-z]{0,3})){1,8}") {
        let once = egress_proxy::path::normalise(&raw).unwrap();
        let twice = egress_proxy::path::normalise(&once.to_string()).unwrap();
        prop_assert_eq!(&once, &twice);
        for view in once.denial_views() {
            prop_assert!(view.starts_with('/'));
            prop_assert!(!view.split('/').any(|s| s == "." || s == ".." || s.eq_ignore_ascii_case("%2e")));
            prop_assert!(!view.contains("//"));
        }
    }

    #[test]
    fn forwarded_heads_are_clean(
        host in domain(),
        path in "(/[a-zA-Z0-9._~-]{0,12}){1,4}",
        headers in prop::collection::vec(("X-[A-Za-z]{1,10}", token_value()), 0..6),
        length in prop::option::of(0u64..100_000),
    ) {
        let mut req = format!("POST http://{host}{path} HTTP/1.1\r\nHost: other.test\r\nProxy-Authorization: Basic eA==\r\nProxy-Connection: keep-alive\r\n");
        for (k, v) in &headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(n) = length {
            req.push_str(&format!("Content-Length: {n}\r\n"));
        }
        req.push_str("\r\n");
        let (r, _) = parse_request(req.as_bytes()).unwrap().unwrap();
        let Request::Http { head, body, path: p, .. } = r else { panic!("not http") };
        let normal = egress_proxy::path::normalise(&path).unwrap().to_string();
        prop_assert_eq!(p.to_string(), normal.clone());
        prop_assert_eq!(body, match length { None | Some(0) => BodyKind::None, Some(n) => BodyKind::Length(n) });
        // The forwarded head re-parses as an origin-form request with one Host (the URL's).
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut hs);
        prop_assert!(parsed.parse(&head).unwrap().is_complete());
        prop_assert_eq!(parsed.path, Some(normal.as_str()));
        let hosts: Vec<_> = parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host")).collect();
        prop_assert_eq!(hosts.len(), 1);
        prop_assert_eq!(hosts[0].value, host.as_bytes());
        prop_assert!(!parsed.headers.iter().any(|h| h.name.to_ascii_lowercase().starts_with("proxy-")));
        let conn: Vec<_> = parsed.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("connection")).collect();
        prop_assert_eq!(conn.len(), 1);
        prop_assert_eq!(conn[0].value, b"close");
    }

    #[test]
    fn chunked_end_is_found_exactly_however_split(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..300), 0..8),
        ext in any::<bool>(),
        trailer in any::<bool>(),
        cuts in prop::collection::vec(0usize..4000, 0..10),
        tail in prop::collection::vec(any::<u8>(), 0..20),
    ) {
        let mut body = Vec::new();
        for c in &chunks {
            body.extend_from_slice(format!("{:x}{}\r\n", c.len(), if ext { ";a=b" } else { "" }).as_bytes());
            body.extend_from_slice(c);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n");
        if trailer {
            body.extend_from_slice(b"X-Trailer: 1\r\n");
        }
        body.extend_from_slice(b"\r\n");
        let end = body.len();
        body.extend_from_slice(&tail);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
        cuts.push(body.len());
        cuts.sort_unstable();
        let mut s = ChunkedScanner::default();
        let mut pos = 0;
        let mut found = None;
        for c in cuts {
            if c <= pos { continue; }
            match s.feed(&body[pos..c]).unwrap() {
                Some(n) => { found = Some(pos + n); break; }
                None => pos = c,
            }
        }
        prop_assert_eq!(found, Some(end));
    }

    #[test]
    fn canonical_names_are_stable(raw in "[a-zA-Z0-9.-]{1,40}") {
        if let Ok(Host::Name(n)) = canonical_host(&raw) {
            prop_assert_eq!(canonical_host(&n).unwrap(), Host::Name(n.clone()));
            prop_assert!(!n.ends_with('.'));
            prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
        }
    }
}
