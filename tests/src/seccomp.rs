//! The agent container's seccomp profile (`image/seccomp/tank-agent.json`, OCI format), turned
//! into a kernel filter the way the container runtime turns it, so the tests apply the very
//! JSON the container gets: it is the single source, nothing here restates its rules.
//!
//! Runtime semantics mirrored here (runc's and crun's): the default action applies to every
//! syscall no rule names; names a runtime does not know for the running architecture (such as
//! `socketcall` on x86_64) are skipped; several conditions on one argument in one rule become
//! separate, OR'ed rules, while conditions on distinct arguments are AND'ed. Comparisons are
//! 64-bit, as libseccomp's are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Path of the profile in the repository.
pub fn profile_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/seccomp/tank-agent.json")
}

/// Syscalls the profile may name that do not exist on x86_64 / aarch64 (skipped, as runtimes do).
const OTHER_ARCH_ONLY: &[&str] = &["socketcall"];

fn syscall_number(name: &str) -> Option<i64> {
    Some(match name {
        "socket" => libc::SYS_socket,
        "socketpair" => libc::SYS_socketpair,
        "io_uring_setup" => libc::SYS_io_uring_setup,
        "io_uring_enter" => libc::SYS_io_uring_enter,
        "io_uring_register" => libc::SYS_io_uring_register,
        _ => return None,
    })
}

/// Compiles the OCI profile text into a seccomp BPF program for this machine.
///
/// Panics on anything the profile uses that this translation does not handle, so a profile
/// change that the test cannot mirror fails loudly instead of being tested half.
pub fn compile(profile: &str) -> BpfProgram {
    let json: serde_json::Value =
        serde_json::from_str(profile).expect("the seccomp profile is valid JSON");
    assert_eq!(
        json["defaultAction"], "SCMP_ACT_ALLOW",
        "the profile is written as default-allow"
    );
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut errno = None;
    let mut unconditional = Vec::new();
    for entry in json["syscalls"].as_array().expect("syscalls array") {
        assert_eq!(
            entry["action"], "SCMP_ACT_ERRNO",
            "every rule of the profile refuses: {entry}"
        );
        let code = entry["errnoRet"].as_u64().unwrap_or(libc::EPERM as u64) as u32;
        assert!(
            errno.is_none_or(|e| e == code),
            "one errno for every rule (seccompiler has one match action)"
        );
        errno = Some(code);
        let args = entry["args"].as_array().cloned().unwrap_or_default();
        let conditions: Vec<SeccompCondition> = args.iter().map(condition).collect();
        let mut indexes: Vec<u64> = args
            .iter()
            .map(|a| a["index"].as_u64().expect("arg index"))
            .collect();
        indexes.sort_unstable();
        let repeated = indexes.windows(2).any(|w| w[0] == w[1]);
        let entry_rules: Vec<SeccompRule> = if conditions.is_empty() {
            Vec::new()
        } else if repeated {
            conditions
                .into_iter()
                .map(|c| SeccompRule::new(vec![c]).expect("rule"))
                .collect()
        } else {
            vec![SeccompRule::new(conditions).expect("rule")]
        };
        for name in entry["names"]
            .as_array()
            .expect("names")
            .iter()
            .map(|n| n.as_str().expect("name"))
        {
            let Some(nr) = syscall_number(name) else {
                assert!(
                    OTHER_ARCH_ONLY.contains(&name),
                    "syscall `{name}` in the profile is unknown to this test: add it"
                );
                continue;
            };
            if entry_rules.is_empty() {
                unconditional.push(nr);
            }
            rules
                .entry(nr)
                .or_default()
                .extend(entry_rules.iter().cloned());
        }
    }
    // An unconditional rule matches every call of its syscall, whatever else names it
    // (seccompiler: an empty rule list).
    for nr in unconditional {
        rules.insert(nr, Vec::new());
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .expect("an architecture seccompiler supports");
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno.unwrap_or(libc::EPERM as u32)),
        arch,
    )
    .expect("seccomp filter");
    filter.try_into().expect("seccomp BPF")
}

fn condition(arg: &serde_json::Value) -> SeccompCondition {
    let index = arg["index"].as_u64().expect("arg index") as u8;
    let value = arg["value"].as_u64().expect("arg value");
    let op = match arg["op"].as_str().expect("arg op") {
        "SCMP_CMP_EQ" => SeccompCmpOp::Eq,
        "SCMP_CMP_NE" => SeccompCmpOp::Ne,
        "SCMP_CMP_GT" => SeccompCmpOp::Gt,
        "SCMP_CMP_GE" => SeccompCmpOp::Ge,
        "SCMP_CMP_LT" => SeccompCmpOp::Lt,
        "SCMP_CMP_LE" => SeccompCmpOp::Le,
        "SCMP_CMP_MASKED_EQ" => SeccompCmpOp::MaskedEq(value),
        other => panic!("comparison {other} not handled"),
    };
    let value = if matches!(op, SeccompCmpOp::MaskedEq(_)) {
        arg["valueTwo"].as_u64().unwrap_or(0)
    } else {
        value
    };
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value).expect("condition")
}

/// Reads and compiles the profile. Done before a probe drops privileges: the checkout may sit
/// in a directory only root can enter.
pub fn load_profile() -> seccompiler::BpfProgram {
    let path = profile_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    compile(&text)
}

/// Installs a compiled profile on the calling thread (and what it execs).
pub fn apply(filter: &seccompiler::BpfProgram) {
    seccompiler::apply_filter(filter).expect("install the seccomp filter");
}
