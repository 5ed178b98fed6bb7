//! SIGHUP reloads the policy; a new policy that does not validate is rejected with a log
//! line and the old one stays in force (never fail open, never fail closed by accident).

mod common;
use common::*;

#[test]
fn a_valid_reload_switches_policy_and_an_invalid_one_keeps_the_old() {
    let dir = tempdir();
    let origin = Origin::echo();
    let p = origin.port;
    let hosts = "[hosts]\n\"a.test\" = \"127.0.0.1\"\n\"b.test\" = \"127.0.0.1\"\n";
    let policy_a = format!("allowed_domains = [{{ domain = \"a.test\", ports = [{p}], allow_private = true }}]\n{hosts}");
    let policy_b = format!("allowed_domains = [{{ domain = \"b.test\", ports = [{p}], allow_private = true }}]\n{hosts}");
    let proxy = Proxy::start(dir.path(), &policy_a);
    let status = |host: &str| {
        let (_, head) = connect_tunnel(proxy.addr, &format!("{host}:{p}"));
        head.lines().next().unwrap_or_default().to_owned()
    };
    assert!(status("a.test").contains("200"));
    assert!(status("b.test").contains("403"));

    // A valid new policy takes effect.
    proxy.reload_with(&config_text(dir.path(), &policy_b));
    assert!(
        proxy.log_text().contains("policy reloaded"),
        "{}",
        proxy.log_text()
    );
    assert!(status("a.test").contains("403"));
    assert!(status("b.test").contains("200"));
    assert_eq!(
        proxy.metric("egress_proxy_reloads_total{result=\"ok\"}"),
        1.0
    );

    // An invalid one (a typo that would allow everything if it were ignored, and a bad
    // port) is rejected, the log names file, line and column, and policy B stays.
    let broken = config_text(
        dir.path(),
        &format!("allowed_domains = [\"*\", \"a.test:{p}\", \"b.test:99999\"]\n{hosts}"),
    );
    proxy.reload_with(&broken);
    let log = proxy.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("reload rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{log}"));
    assert!(line.contains("keeping the previous policy"), "{line}");
    assert!(
        line.contains(&format!("{}:6:20:", proxy.config.display())),
        "{line}"
    );
    assert!(
        status("a.test").contains("403"),
        "the rejected policy took effect"
    );
    assert!(
        status("b.test").contains("200"),
        "the old policy was dropped"
    );
    assert_eq!(
        proxy.metric("egress_proxy_reloads_total{result=\"rejected\"}"),
        1.0
    );

    // A file that is not even TOML is rejected the same way, in one line.
    proxy.reload_with("listen = [\n");
    assert!(status("b.test").contains("200"));
    let log = proxy.log_text();
    let at = log.rfind("reload rejected").expect("the second rejection");
    let rest = &log[at..];
    let line = rest.lines().next().unwrap();
    assert!(
        line.contains(&format!("{}:2:1:", proxy.config.display())),
        "{line}"
    );
    assert!(
        rest.lines()
            .nth(1)
            .is_none_or(|next| next.starts_with("20")),
        "the rejection spans more than one line:\n{rest}"
    );
    assert_eq!(
        proxy.metric("egress_proxy_reloads_total{result=\"rejected\"}"),
        2.0
    );
}
