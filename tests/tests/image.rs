//! The appliance (image/): what can be checked without building a Fedora image or booting
//! systemd as PID 1.
//!
//! - every systemd unit and drop-in passes `systemd-analyze verify` with no diagnostic at all
//!   (an unknown directive is only a warning there, so any output fails the test);
//! - the agent Quadlet uses only keys Podman 4.4's Quadlet knows, and keeps its promises:
//!   host network, no added capability, the seccomp profile, two writable host paths;
//! - every path the Containerfile copies exists in the repository or is a binary the workspace
//!   builds (from `cargo metadata`), and every binary and file a unit names is installed by
//!   the image stage that installs the unit;
//! - the default configs (and the cloud-init example's) validate with the real binaries;
//! - the agent's UID is the same in every file that names it.
//!
//! Needs `systemd-analyze` (Debian package `systemd`) and the release or debug binaries of
//! tank-loader and egress-proxy next to this test (`cargo xtask test` builds them). Not root,
//! no network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use tank_integration_tests::appliance::{
    cloud_init_file, parse_ini, read, repo, values, AGENT_UID,
};
use tank_integration_tests::workspace_bin;

// ---- unit files ---------------------------------------------------------------------------

/// The executable of an `Exec*=` value, without systemd's prefixes (`-`, `+`, `@`, `!`, `:`).
fn exec_binary(value: &str) -> &str {
    value
        .trim_start_matches(['-', '+', '@', '!', ':'])
        .split_whitespace()
        .next()
        .unwrap_or("")
}

const LOADER_UNIT: &str = "image/systemd/tank-loader.service";
const PROXY_UNIT: &str = "image/systemd/egress-proxy.service";
const USER_DROPIN: &str = "image/systemd/user@2000.service.d/50-tank.conf";
const QUADLET: &str = "image/quadlet/tank-agent.container";

/// Binaries the units use that the OS image provides, with the Fedora package that does.
const OS_BINARIES: &[(&str, &str)] = &[
    ("/usr/bin/mountpoint", "util-linux"),
    ("/usr/bin/kill", "util-linux-core"),
];

/// Runs `systemd-analyze verify` on `units` (file names in `dir`, which also holds drop-in
/// directories). Returns its diagnostics; empty means clean.
fn systemd_verify(dir: &Path, units: &[&str]) -> Vec<String> {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(units.iter().map(|u| dir.join(u)))
        // The directory first, then the host's own units (user@.service, targets).
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.display()))
        .output()
        .expect("systemd-analyze not found: install the Debian package `systemd` (tests/tests/image.rs needs it)");
    let mut diags: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if !out.status.success() && diags.is_empty() {
        diags.push(format!("systemd-analyze verify exited with {}", out.status));
    }
    diags
}

/// A copy of the image's units in a temporary directory with the workspace's binaries at the
/// paths the image installs them to replaced by the real built ones, so systemd-analyze checks
/// they exist and are executable.
struct UnitDir {
    dir: tempfile::TempDir,
}

impl UnitDir {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let loader = workspace_bin("tank-loader");
        let proxy = workspace_bin("egress-proxy");
        let rewrite = |text: &str| {
            text.replace("/usr/bin/tank-loader", loader.to_str().unwrap())
                .replace("/usr/bin/egress-proxy", proxy.to_str().unwrap())
        };
        for (src, dst) in [
            (LOADER_UNIT, "tank-loader.service"),
            (PROXY_UNIT, "egress-proxy.service"),
            (USER_DROPIN, "user@2000.service.d/50-tank.conf"),
        ] {
            let path = dir.path().join(dst);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, rewrite(&read(src))).unwrap();
        }
        std::fs::write(
            dir.path().join("tank-agent.service"),
            quadlet_as_service(&read(QUADLET)),
        )
        .unwrap();
        Self { dir }
    }
}

/// What Quadlet's generator makes of the `.container` file, as far as systemd is concerned:
/// [Unit], [Service] and [Install] pass through verbatim, [Container] becomes a `podman run`
/// command line plus the service settings Quadlet adds (Podman 4.4's generator adds these).
/// `podman` itself is not on this machine, so a stand-in executable runs.
fn quadlet_as_service(text: &str) -> String {
    let mut out = String::new();
    let mut section = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            if section != "Container" {
                out.push_str(line);
                out.push('\n');
            }
            if section == "Service" {
                out.push_str("Type=notify\nNotifyAccess=all\nKillMode=mixed\nDelegate=yes\nSyslogIdentifier=%N\n");
                out.push_str("Environment=PODMAN_SYSTEMD_UNIT=%n\nExecStart=/bin/true\n");
            }
            continue;
        }
        if section != "Container" {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn every_unit_passes_systemd_analyze_verify_without_a_diagnostic() {
    let units = UnitDir::new();
    // tank-loader.service BindsTo user@2000.service, so verifying it loads the drop-in too.
    let diags = systemd_verify(
        units.dir.path(),
        &[
            "tank-loader.service",
            "egress-proxy.service",
            "tank-agent.service",
        ],
    );
    assert!(
        diags.is_empty(),
        "systemd-analyze verify reported:\n{}",
        diags.join("\n")
    );
}

#[test]
fn the_user_manager_drop_in_is_loaded_and_verified() {
    let units = UnitDir::new();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "user@2000.service"])
        .env(
            "SYSTEMD_UNIT_PATH",
            format!("{}:", units.dir.path().display()),
        )
        .output()
        .expect("systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "user@2000.service with the drop-in:\n{text}"
    );
    // Loaded at all: a deliberately bad key in a copy must be reported.
    let dropin = units.dir.path().join("user@2000.service.d/50-tank.conf");
    let good = std::fs::read_to_string(&dropin).unwrap();
    std::fs::write(
        &dropin,
        good.replace("After=tank-loader.service", "Aftr=tank-loader.service"),
    )
    .unwrap();
    let diags = systemd_verify(units.dir.path(), &["tank-loader.service"]);
    assert!(
        diags.iter().any(|d| d.contains("Aftr")),
        "a misspelled key in the drop-in went unnoticed: {diags:?}"
    );
}

#[test]
fn the_verify_check_fails_on_a_misspelled_directive() {
    // The check above is only worth something if a typo makes it fail.
    let units = UnitDir::new();
    let path = units.dir.path().join("tank-loader.service");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("\nRestart=always\n"));
    std::fs::write(
        &path,
        text.replace("\nRestart=always\n", "\nRestrat=always\n"),
    )
    .unwrap();
    let diags = systemd_verify(units.dir.path(), &["tank-loader.service"]);
    assert!(
        diags.iter().any(|d| d.contains("Restrat")),
        "a misspelled directive went unnoticed: {diags:?}"
    );

    let text = text.replace("ExecStart=", "ExecStart=/usr/bin/tank-loadr run #");
    std::fs::write(&path, text).unwrap();
    let diags = systemd_verify(units.dir.path(), &["tank-loader.service"]);
    assert!(!diags.is_empty(), "a missing binary went unnoticed");
}

#[test]
fn the_loader_is_ready_before_the_agent_user_and_bound_to_it() {
    let loader = parse_ini(&read(LOADER_UNIT));
    let user = format!("user@{AGENT_UID}.service");
    assert_eq!(
        values(&loader, "Service", "Type"),
        ["notify"],
        "READY=1 only once enforcement is pinned"
    );
    assert_eq!(values(&loader, "Service", "Restart"), ["always"]);
    assert!(values(&loader, "Unit", "Before")
        .iter()
        .any(|v| v.split_whitespace().any(|u| u == user)));
    assert!(values(&loader, "Unit", "BindsTo")
        .iter()
        .any(|v| v.split_whitespace().any(|u| u == user)));
    let dropin = parse_ini(&read(USER_DROPIN));
    // Wants=, never Requires=/BindsTo=/PartOf=: those restart the agent's manager (killing the
    // agent) whenever systemd restarts a crashed loader; tests/tests/boot.rs shows it.
    assert!(values(&dropin, "Unit", "Wants").contains(&"tank-loader.service"));
    for key in ["Requires", "BindsTo", "PartOf", "Requisite"] {
        assert!(
            !values(&dropin, "Unit", key).contains(&"tank-loader.service"),
            "{key}=tank-loader.service in the drop-in restarts the agent on every loader crash"
        );
    }
    assert!(values(&dropin, "Unit", "After").contains(&"tank-loader.service"));
    assert!(
        values(&dropin, "Service", "ExecStartPre")
            .iter()
            .any(|v| v.starts_with('+') && v.contains("tank-loader status")),
        "the user manager must refuse to start unless the gate is on its cgroup"
    );
    // Capabilities the loader's setup needs, and CAP_SETPCAP to drop the bounding set after.
    let caps = values(&loader, "Service", "CapabilityBoundingSet").join(" ");
    for cap in ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SETPCAP"] {
        assert!(
            caps.split_whitespace().any(|c| c == cap),
            "CapabilityBoundingSet lacks {cap}: {caps}"
        );
    }
    // These would make /sys/fs/cgroup or /sys/fs/bpf read-only, or put nft in another netns.
    for forbidden in [
        "ProtectControlGroups",
        "ProtectKernelTunables",
        "PrivateNetwork",
        "PrivateUsers",
    ] {
        let set = values(&loader, "Service", forbidden);
        assert!(
            set.iter().all(|v| *v == "no" || *v == "false"),
            "{forbidden}= breaks the loader: {set:?}"
        );
    }
}

// ---- Quadlet ------------------------------------------------------------------------------

/// Keys Podman 4.4's Quadlet accepts in [Container] (it rejects the whole file on any other).
/// Source: podman's docs/source/markdown/podman-systemd.unit.5.md and
/// pkg/systemd/quadlet/quadlet.go (supportedContainerKeys) at v4.4.0; cross-checked with the
/// per-version lists of containers/podlet (src/quadlet/container.rs: the keys it moves to
/// PodmanArgs= for 4.4 are the ones added in 4.5 and later: Secret, Mount, Tmpfs, UserNS, IP,
/// LogDriver, Rootfs, most Health*, Pull, WorkingDir, HostName, Sysctl, Mask, ...). Every key
/// here is still accepted by Podman 5.
const QUADLET_4_4_CONTAINER_KEYS: &[&str] = &[
    "AddCapability",
    "AddDevice",
    "Annotation",
    "ContainerName",
    "DropCapability",
    "Environment",
    "EnvironmentFile",
    "EnvironmentHost",
    "Exec",
    "ExposeHostPort",
    "Group",
    "HealthCmd",
    "Image",
    "Label",
    "Network",
    "NoNewPrivileges",
    "Notify",
    "PodmanArgs",
    "PublishPort",
    "ReadOnly",
    "RemapGid",
    "RemapUid",
    "RemapUidSize",
    "RemapUsers",
    "RunInit",
    "SeccompProfile",
    "SecurityLabelDisable",
    "SecurityLabelFileType",
    "SecurityLabelLevel",
    "SecurityLabelType",
    "Timezone",
    "User",
    "VolatileTmp",
    "Volume",
];

/// Sections a 4.4 `.container` file may have ([Quadlet] came with Podman 5).
const QUADLET_4_4_SECTIONS: &[&str] = &["Unit", "Container", "Service", "Install"];

fn quadlet_problems(text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (section, key, _, line) in parse_ini(text) {
        if !QUADLET_4_4_SECTIONS.contains(&section.as_str()) {
            problems.push(format!(
                "line {line}: section [{section}] is not known to Podman 4.4's Quadlet"
            ));
        } else if section == "Container" && !QUADLET_4_4_CONTAINER_KEYS.contains(&key.as_str()) {
            problems.push(format!(
                "line {line}: [Container] key `{key}` is not known to Podman 4.4's Quadlet"
            ));
        }
    }
    problems
}

#[test]
fn the_quadlet_uses_only_keys_podman_4_4_knows() {
    let problems = quadlet_problems(&read(QUADLET));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // And the check catches what it is for: a typo, a 4.5 key, a 5.0 section.
    assert_eq!(quadlet_problems("[Container]\nNetwrok=host\n").len(), 1);
    assert_eq!(quadlet_problems("[Container]\nSecret=x\n").len(), 1);
    assert_eq!(
        quadlet_problems("[Quadlet]\nDefaultDependencies=false\n").len(),
        1
    );
}

/// (host path, container path, options) of each `Volume=`.
fn volumes(ini: &[(String, String, String, usize)]) -> Vec<(String, String, Vec<String>)> {
    values(ini, "Container", "Volume")
        .into_iter()
        .map(|v| {
            let mut parts = v.splitn(3, ':');
            let host = parts.next().unwrap().to_owned();
            let ctr = parts
                .next()
                .unwrap_or_else(|| panic!("Volume={v} names no container path"))
                .to_owned();
            let opts = parts
                .next()
                .unwrap_or("")
                .split(',')
                .filter(|o| !o.is_empty())
                .map(str::to_owned)
                .collect();
            (host, ctr, opts)
        })
        .collect()
}

#[test]
fn the_agent_runs_rootless_on_the_host_network_with_two_writable_paths() {
    let q = parse_ini(&read(QUADLET));
    assert_eq!(
        values(&q, "Container", "Network"),
        ["host"],
        "the agent's own connects must hit the guarded cgroup"
    );
    assert!(
        values(&q, "Container", "AddCapability").is_empty(),
        "no added capability"
    );
    assert_eq!(values(&q, "Container", "DropCapability"), ["all"]);
    assert_eq!(values(&q, "Container", "NoNewPrivileges"), ["true"]);
    assert_eq!(values(&q, "Container", "ReadOnly"), ["true"]);
    assert!(values(&q, "Container", "User").is_empty() || values(&q, "Container", "User") != ["0"]);
    let args = values(&q, "Container", "PodmanArgs").join(" ");
    for bad in [
        "--privileged",
        "--cap-add",
        "--network",
        "--net=",
        "--security-opt",
        "--device",
        "-v ",
        "--volume",
        "--mount",
    ] {
        assert!(
            !args.contains(bad),
            "PodmanArgs must not contain {bad}: {args}"
        );
    }
    let writable: Vec<_> = volumes(&q)
        .into_iter()
        .filter(|(_, _, o)| !o.iter().any(|o| o == "ro"))
        .collect();
    assert_eq!(
        writable.len(),
        2,
        "exactly two writable host paths, found {writable:?}"
    );
    let env = read("image/config/agent.env") + &read("image/cloud-init/user-data.yaml");
    for var in ["HTTPS_PROXY=", "HTTP_PROXY="] {
        assert!(env.contains(var), "{var} is set nowhere for the agent");
    }
    // The instruction file reaches the agent read-only.
    assert!(volumes(&q)
        .iter()
        .any(|(h, _, o)| h.ends_with("AGENT_INSTRUCTIONS.md") && o.iter().any(|o| o == "ro")));
}

// ---- Containerfile ------------------------------------------------------------------------

/// One image stage: its parent stage (if another stage of this file) and what it installs.
#[derive(Default, Debug)]
struct Stage {
    parent: Option<String>,
    /// destination path -> source (a repository path, or `build:` + a path in the build stage)
    installs: BTreeMap<String, String>,
    runs: Vec<String>,
}

/// The Containerfile's stages, with `RUN` lines joined across continuations.
fn containerfile() -> BTreeMap<String, Stage> {
    let text = read("image/Containerfile").replace("\\\n", " ");
    let mut stages: BTreeMap<String, Stage> = BTreeMap::new();
    let mut current = String::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "FROM" => {
                let name = words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case("AS"))
                    .map(|i| words[i + 1])
                    .expect("every stage is named");
                let parent = stages.contains_key(words[1]).then(|| words[1].to_owned());
                stages.insert(
                    name.to_owned(),
                    Stage {
                        parent,
                        ..Stage::default()
                    },
                );
                current = name.to_owned();
            }
            "COPY" => {
                let stage = stages.get_mut(&current).expect("COPY after FROM");
                let from = words.iter().find_map(|w| w.strip_prefix("--from="));
                let paths: Vec<&str> = words[1..]
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with("--"))
                    .collect();
                let (dest, srcs) = paths.split_last().expect("COPY SRC DEST");
                for src in srcs {
                    let source = match from {
                        Some(stage) => format!("{stage}:{src}"),
                        None => (*src).to_owned(),
                    };
                    let dest = if dest.ends_with('/') && !src.ends_with('/') {
                        format!(
                            "{dest}{}",
                            Path::new(src).file_name().unwrap().to_str().unwrap()
                        )
                    } else {
                        (*dest).to_owned()
                    };
                    stage.installs.insert(dest, source);
                }
            }
            "RUN" => stages
                .get_mut(&current)
                .expect("RUN after FROM")
                .runs
                .push(line.to_owned()),
            _ => {}
        }
    }
    stages
}

/// Everything stage `name` has installed, its ancestors' included.
fn installed(stages: &BTreeMap<String, Stage>, name: &str) -> BTreeMap<String, String> {
    let stage = &stages[name];
    let mut all = stage
        .parent
        .as_deref()
        .map(|p| installed(stages, p))
        .unwrap_or_default();
    all.extend(stage.installs.clone());
    all
}

/// The stage that installs repository file `src`.
fn stage_installing(stages: &BTreeMap<String, Stage>, src: &str) -> String {
    let found: Vec<_> = stages
        .iter()
        .filter(|(_, s)| s.installs.values().any(|v| v == src))
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{src} must be installed by exactly one stage, found {found:?}"
    );
    found[0].clone()
}

/// Binary targets of the workspace, by package.
fn cargo_bins() -> BTreeMap<String, String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut bins = BTreeMap::new();
    for package in meta["packages"].as_array().unwrap() {
        for target in package["targets"].as_array().unwrap() {
            if target["kind"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k == "bin")
            {
                bins.insert(
                    target["name"].as_str().unwrap().to_owned(),
                    package["name"].as_str().unwrap().to_owned(),
                );
            }
        }
    }
    bins
}

#[test]
fn every_containerfile_copy_names_a_repository_file_or_a_built_binary() {
    let stages = containerfile();
    let bins = cargo_bins();
    let build = &stages["build"];
    let cargo_build = build
        .runs
        .iter()
        .find(|r| r.contains("cargo build --release"))
        .expect("the build stage runs cargo build --release");
    let built_packages: BTreeSet<&str> = cargo_build
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "-p")
        .map(|w| w[1])
        .collect();
    for (name, stage) in &stages {
        for (dest, src) in &stage.installs {
            if let Some(path) = src.strip_prefix("build:") {
                if let Some(bin) = path.strip_prefix("/src/target/release/") {
                    let package = bins.get(bin).unwrap_or_else(|| panic!("stage {name} copies {bin}, which no workspace package builds (bins: {bins:?})"));
                    assert!(
                        built_packages.contains(package.as_str()),
                        "{bin} comes from {package}, which `{cargo_build}` does not build"
                    );
                    assert_eq!(dest, &format!("/usr/bin/{bin}"), "binaries go to /usr/bin");
                } else {
                    assert!(
                        path.starts_with("/src/target/dist/"),
                        "stage {name}: unexpected build output {path}"
                    );
                }
            } else if src != "." {
                assert!(
                    repo().join(src).exists(),
                    "stage {name} copies {src}, which is not in the repository"
                );
            }
        }
    }
}

/// Absolute paths a unit depends on: executables and files it reads.
fn referenced_paths(ini: &[(String, String, String, usize)]) -> Vec<String> {
    let mut paths = Vec::new();
    for (_, key, value, _) in ini {
        if key.starts_with("Exec") {
            paths.push(exec_binary(value).to_owned());
            let words: Vec<&str> = value.split_whitespace().collect();
            for w in words.windows(2) {
                if w[0] == "--config" {
                    paths.push(w[1].to_owned());
                }
            }
        }
        if matches!(key.as_str(), "EnvironmentFile" | "SeccompProfile") {
            paths.push(value.trim_start_matches('-').to_owned());
        }
    }
    paths
}

#[test]
fn every_binary_and_config_a_unit_names_is_installed_by_its_image_stage() {
    let stages = containerfile();
    let bins = cargo_bins();
    let tmpfiles = read("image/tmpfiles.d/tank-agent.conf");
    let made_by_tmpfiles = |p: &str| {
        tmpfiles
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(p))
    };
    let drop_in_dest = format!("/usr/lib/systemd/system/user@{AGENT_UID}.service.d/50-tank.conf");
    for unit in [LOADER_UNIT, PROXY_UNIT, USER_DROPIN, QUADLET] {
        let stage = stage_installing(&stages, unit);
        let have = installed(&stages, &stage);
        let ini = parse_ini(&read(unit));
        let mut paths = referenced_paths(&ini);
        paths.extend(volumes(&ini).into_iter().map(|(host, _, _)| host));
        assert!(!paths.is_empty(), "{unit} names nothing?");
        for path in paths {
            assert!(path.starts_with('/'), "{unit}: `{path}` is not absolute");
            // systemd-analyze verify checks these exist (on this host) and are executable.
            if OS_BINARIES.iter().any(|(p, _)| *p == path) {
                continue;
            }
            if let Some(bin) = path.strip_prefix("/usr/bin/") {
                assert!(
                    bins.contains_key(bin),
                    "{unit} runs {path}: not a workspace binary and not in OS_BINARIES"
                );
            }
            assert!(
                have.contains_key(&path) || made_by_tmpfiles(&path),
                "{unit} names {path}, which image stage `{stage}` does not install"
            );
        }
    }
    assert!(installed(&stages, "agent-host").contains_key(&drop_in_dest));
    // The loader's unit and the proxy's are on different hosts.
    assert_ne!(
        stage_installing(&stages, LOADER_UNIT),
        stage_installing(&stages, PROXY_UNIT)
    );
}

#[test]
fn a_unit_naming_a_binary_the_build_does_not_make_is_caught() {
    let stages = containerfile();
    let have = installed(&stages, "agent-host");
    let ini =
        parse_ini("[Service]\nExecStart=/usr/bin/tank-loadr run --config /etc/tank/loader.toml\n");
    let paths = referenced_paths(&ini);
    assert!(!cargo_bins().contains_key("tank-loadr") && !have.contains_key(&paths[0]));
    let ini =
        parse_ini("[Service]\nExecStart=/usr/bin/tank-loader run --config /etc/tank/lodaer.toml\n");
    assert!(!have.contains_key(&referenced_paths(&ini)[1]));
}

// ---- configs ------------------------------------------------------------------------------

fn check(bin: &str, file: &Path) {
    let out = Command::new(workspace_bin(bin))
        .arg("check")
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{bin} check {} failed:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn default_configs_and_the_cloud_init_example_validate() {
    check("tank-loader", &repo().join("image/config/loader.toml"));
    check("egress-proxy", &repo().join("image/config/policy.toml"));
    let dir = tempfile::tempdir().unwrap();
    let first_boot = dir.path().join("loader.toml");
    std::fs::write(&first_boot, cloud_init_file("/etc/tank/loader.toml")).unwrap();
    check("tank-loader", &first_boot);
    // The image default denies everything until first boot names the proxy.
    let default = read("image/config/loader.toml");
    assert!(
        default.lines().any(|l| l.trim() == "proxies = []"),
        "the image must not ship a proxy address"
    );
    // Both halves of the proxy address that cloud-init writes agree.
    let loader = cloud_init_file("/etc/tank/loader.toml");
    let env = cloud_init_file("/etc/tank/agent.env");
    let proxy = loader
        .lines()
        .find_map(|l| l.trim().strip_prefix("proxies = [\""))
        .and_then(|l| l.split('"').next())
        .unwrap();
    assert!(
        env.contains(&format!("HTTPS_PROXY=http://{proxy}")),
        "agent.env and loader.toml name different proxies"
    );
}

#[test]
fn the_agent_uid_is_the_same_everywhere() {
    let uid = AGENT_UID;
    let sysusers = read("image/sysusers.d/tank-agent.conf");
    assert!(
        sysusers.lines().any(|l| l
            .split_whitespace()
            .take(3)
            .eq(["u", "agent", &uid.to_string()])),
        "{sysusers}"
    );
    let cgroup = format!("cgroup = \"/user.slice/user-{uid}.slice/user@{uid}.service\"");
    assert!(read("image/config/loader.toml").contains(&cgroup));
    assert!(cloud_init_file("/etc/tank/loader.toml").contains(&cgroup));
    let stages = containerfile();
    let agent = installed(&stages, "agent-host");
    assert_eq!(
        agent
            .get(&format!(
                "/etc/containers/systemd/users/{uid}/tank-agent.container"
            ))
            .map(String::as_str),
        Some(QUADLET)
    );
    assert!(read(LOADER_UNIT).contains(&format!("Before=user@{uid}.service")));
    assert!(read(USER_DROPIN).contains("tank-loader status"));
    assert!(USER_DROPIN.contains(&format!("user@{uid}.service.d")));
    assert!(read("image/cloud-init/user-data.yaml")
        .contains(&format!("XDG_RUNTIME_DIR=/run/user/{uid}")));
}

#[test]
fn the_nft_uid_range_covers_the_agent_user_and_its_subordinate_range() {
    let containerfile = read("image/Containerfile");
    let subuid = containerfile
        .split("echo \"agent:")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("the Containerfile gives `agent` a subordinate UID range");
    let (first, count) = subuid.split_once(':').unwrap();
    let (first, count): (u32, u32) = (first.parse().unwrap(), count.parse().unwrap());
    let wanted = vec![(AGENT_UID, AGENT_UID), (first, first + count - 1)];
    for (what, text) in [
        ("loader.toml", read("image/config/loader.toml")),
        (
            "the cloud-init loader.toml",
            cloud_init_file("/etc/tank/loader.toml"),
        ),
    ] {
        let config = tank_loader::config::Config::parse(&text, what).expect(what);
        assert_eq!(
            config.nft.uid_ranges, wanted,
            "{what}: every uid agent processes run as"
        );
    }
}
