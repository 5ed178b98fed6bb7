//! The Grafana dashboard (image/grafana/tank-dashboard.json) asks only for metrics the two
//! programs export: every panel's PromQL and every variable's query names metric families
//! taken from the programs' own exposition code (`# TYPE` lines of tank-loader's and
//! egress-proxy's renderers), not from a second list. Needs no root.

use std::collections::BTreeSet;

/// Every metric family name in a text exposition.
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The metric names a PromQL expression selects: identifiers outside strings, label
/// matchers, ranges and `by (...)` lists that are not functions, keywords or numbers.
fn metric_names(expr: &str) -> Vec<String> {
    // `label_values(METRIC, LABEL)` (a Grafana variable query): only METRIC is a metric.
    let expr = match expr.strip_prefix("label_values(") {
        Some(rest) => rest.split(',').next().unwrap_or(""),
        None => expr,
    };
    let mut plain = String::new();
    let (mut depth_brace, mut depth_bracket, mut quote) = (0, 0, None);
    for c in expr.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{') => depth_brace += 1,
            (None, '}') => depth_brace -= 1,
            (None, '[') => depth_bracket += 1,
            (None, ']') => depth_bracket -= 1,
            (None, c) if depth_brace == 0 && depth_bracket == 0 => plain.push(c),
            _ => {}
        }
    }
    let mut names = Vec::new();
    let chars: Vec<char> = plain.chars().collect();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            match word.as_str() {
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right" => {
                    skip_group = true
                }
                // Aggregations may put `by (...)` before their parenthesis.
                "sum" | "min" | "max" | "avg" | "count" | "group" | "stddev" | "stdvar"
                | "topk" | "bottomk" | "quantile" | "count_values" => {}
                "bool" | "offset" | "and" | "or" | "unless" => {}
                _ if next == Some(&'(') => {}
                _ => names.push(word),
            }
            continue;
        }
        if c == '(' && skip_group {
            // A label list: skip to its end.
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            skip_group = false;
        }
        i += 1;
    }
    names
}

#[test]
fn every_dashboard_query_names_a_metric_the_loader_or_the_proxy_exports() {
    let loader = families(&tank_loader::metrics::render(&Default::default()));
    let proxy = families(&egress_proxy::metrics::Metrics::default().render());
    assert!(
        loader.len() >= 10 && proxy.len() >= 10,
        "{loader:?} {proxy:?}"
    );
    let exported: BTreeSet<&String> = loader.iter().chain(&proxy).collect();

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../image/grafana/tank-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).expect("dashboard JSON");
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_owned();
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: no targets"));
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            queries.push((title.clone(), t["expr"].as_str().unwrap().to_owned()));
        }
    }
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            queries.push((format!("variable {}", var["name"]), q.to_owned()));
        }
    }
    let mut used = BTreeSet::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{title}: `{expr}` names no metric");
        for name in names {
            assert!(
                exported.contains(&name),
                "{title}: `{expr}` asks for `{name}`, which neither program exports"
            );
            used.insert(name);
        }
    }
    // Both programs are on the dashboard, most of each.
    for (program, names) in [("tank-loader", &loader), ("egress-proxy", &proxy)] {
        let missing: Vec<_> = names.iter().filter(|n| !used.contains(*n)).collect();
        assert!(
            missing.len() <= 2,
            "{program} families not on the dashboard: {missing:?}"
        );
    }
}

#[test]
fn the_query_parser_finds_metrics_and_skips_labels_functions_and_ranges() {
    assert_eq!(
        metric_names(
            "sum by (hook, reason) (rate(tank_attempts_total{verdict=\"deny\"}[$__rate_interval]))"
        ),
        ["tank_attempts_total"]
    );
    assert_eq!(
        metric_names("tank_ring_buffer_used_bytes{a=\"x\"} / tank_ring_buffer_size_bytes"),
        ["tank_ring_buffer_used_bytes", "tank_ring_buffer_size_bytes"]
    );
    assert_eq!(
        metric_names("time() - tank_loader_start_time_seconds"),
        ["tank_loader_start_time_seconds"]
    );
    assert_eq!(
        metric_names("label_values(egress_proxy_audit_healthy, instance)"),
        ["egress_proxy_audit_healthy"]
    );
    assert_eq!(
        metric_names("rate(tank_atempts_total[5m])"),
        ["tank_atempts_total"]
    );
}
