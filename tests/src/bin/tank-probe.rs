//! `tank-probe`: one network attempt, made with the plain syscalls an attacker would use, and
//! its outcome on stdout (`ok`, or the errno name such as `EPERM`).
//!
//! The tests run it inside the guarded cgroup (optionally as an unprivileged user) so each
//! attempt is a real process making a real system call, not a simulation.
//!
//! Usage: tank-probe [--cgroup DIR] [--uid N] ATTEMPT ARGS...
//!   tcp ADDR:PORT            TCP connect
//!   udp-sendto ADDR:PORT     unconnected UDP sendto
//!   udp-connect ADDR:PORT    connect a UDP socket, then send
//!   flood ADDR:PORT N        N TCP connects; prints "ok=A eperm=B other=C"

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(dir) = take_opt(&mut args, "--cgroup") {
        std::fs::write(format!("{dir}/cgroup.procs"), std::process::id().to_string()).expect("join the cgroup");
    }
    if let Some(uid) = take_opt(&mut args, "--uid") {
        let uid: u32 = uid.parse().expect("numeric uid");
        nix::unistd::setgroups(&[]).expect("setgroups");
        nix::unistd::setgid(nix::unistd::Gid::from_raw(uid)).expect("setgid");
        nix::unistd::setuid(nix::unistd::Uid::from_raw(uid)).expect("setuid");
    }
    let attempt = args.first().map(String::as_str).unwrap_or("");
    let target = |i: usize| -> SocketAddr { args.get(i).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage()) };
    let outcome = match attempt {
        "tcp" => TcpStream::connect_timeout(&target(1), Duration::from_secs(2)).map(drop),
        "udp-sendto" => bind_any(&target(1)).and_then(|s| s.send_to(b"probe", target(1))).map(drop),
        "udp-connect" => bind_any(&target(1)).and_then(|s| s.connect(target(1)).and_then(|()| s.send(b"probe"))).map(drop),
        "flood" => {
            let n: u32 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or_else(|| usage());
            let (mut ok, mut eperm, mut other) = (0, 0, 0);
            for _ in 0..n {
                match TcpStream::connect_timeout(&target(1), Duration::from_secs(2)) {
                    Ok(_) => ok += 1,
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
                    Err(_) => other += 1,
                }
            }
            println!("ok={ok} eperm={eperm} other={other}");
            return;
        }
        _ => usage(),
    };
    match outcome {
        Ok(()) => println!("ok"),
        Err(e) => println!("{}", e.raw_os_error().map_or_else(|| e.to_string(), errno_name)),
    }
}

fn bind_any(target: &SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
}

fn errno_name(code: i32) -> String {
    match code {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        other => format!("errno {other}"),
    }
}

fn take_opt(args: &mut Vec<String>, name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    let value = args.get(i + 1).cloned().unwrap_or_else(|| usage());
    args.drain(i..=i + 1);
    Some(value)
}

fn usage() -> ! {
    eprintln!("usage: tank-probe [--cgroup DIR] [--uid N] tcp|udp-sendto|udp-connect ADDR:PORT | flood ADDR:PORT N");
    std::process::exit(2)
}
