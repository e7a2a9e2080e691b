//! The `pgfront` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use pgfront::config::Config;

#[derive(Parser)]
#[command(
    name = "pgfront",
    version,
    about = "PostgreSQL HA front end: routes clients to the Patroni primary learned from etcd"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the load-balancer daemon.
    Proxy {
        #[arg(short, long, default_value = "/etc/pgfront/pgfront.toml", env = "PGFRONT_CONFIG")]
        config: PathBuf,
    },
    /// The node agent beside a PostgreSQL: probes it, publishes its role to etcd under a lease,
    /// answers Patroni-compatible health checks (`pgfront agent -c /etc/pgfront/agent.toml`).
    Agent {
        #[arg(short, long, global = true, default_value = "/etc/pgfront/agent.toml", env = "PGFRONT_AGENT_CONFIG")]
        config: PathBuf,
        #[command(subcommand)]
        cmd: Option<AgentCmd>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Floating addresses.
    Vip {
        #[command(subcommand)]
        cmd: VipCmd,
    },
    /// Show clusters, members and listeners of a running proxy (from its admin endpoint).
    Status {
        /// Admin endpoint of the proxy.
        #[arg(long, default_value = "http://127.0.0.1:7000")]
        admin: String,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain a member: no new connections to it on any listener of its cluster; its open
    /// sessions are kept, or closed with --kill. Lasts until `pgfront resume` (reloads and
    /// upgrades keep it).
    Drain {
        /// The member's name, as Patroni names it.
        member: String,
        /// The member's cluster (needed when several clusters have a member of that name).
        #[arg(long)]
        cluster: Option<String>,
        /// Close its open sessions too.
        #[arg(long)]
        kill: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Resume a drained member: it takes new connections again as its role allows.
    Resume {
        member: String,
        #[arg(long)]
        cluster: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Nagios / Icinga plugin: one status line, exit 0 OK / 1 WARNING / 2 CRITICAL / 3 UNKNOWN
    /// (`pgfront check --help`).
    #[command(disable_help_flag = true)]
    Check {
        /// Passed to the plugin's own parser, so bad arguments exit 3 (UNKNOWN), not clap's 2.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The io_uring relay experiment (issue 10; `--features uring-experiment`): relays each
    /// `--route LISTEN=TARGET` until killed.
    #[cfg(feature = "uring-experiment")]
    #[command(hide = true)]
    UringRelay {
        #[arg(long = "route", value_parser = parse_route, required = true)]
        routes: Vec<(std::net::SocketAddr, std::net::SocketAddr)>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

#[cfg(feature = "uring-experiment")]
fn parse_route(s: &str) -> Result<(std::net::SocketAddr, std::net::SocketAddr), String> {
    let (l, t) = s.split_once('=').ok_or("LISTEN=TARGET")?;
    Ok((l.parse().map_err(|e| format!("{l}: {e}"))?, t.parse().map_err(|e| format!("{t}: {e}"))?))
}

/// Where the control commands send their request.
#[derive(clap::Args)]
struct AdminArgs {
    /// Admin endpoint of the proxy [default: http://127.0.0.1:7000, or the `[admin] listen`
    /// of --config].
    #[arg(long)]
    admin: Option<String>,
    /// The `[admin] token` of the proxy's configuration (needed from another host, or with
    /// require_token); prefer the environment variable, which `ps` does not show.
    #[arg(long, env = "PGFRONT_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Take the admin address and token from the proxy's configuration file (on its own host).
    #[arg(short, long)]
    config: Option<PathBuf>,
}

impl AdminArgs {
    /// The endpoint's URL and the token to send, from the options or the configuration file.
    fn resolve(&self) -> Result<(String, Option<String>), String> {
        let file = match &self.config {
            Some(path) => Some(Config::load(path).map_err(|e| e.to_string())?),
            None => None,
        };
        let admin = match (&self.admin, file.as_ref().and_then(|c| c.admin)) {
            (Some(a), _) => a.clone(),
            (None, Some(mut addr)) => {
                // An endpoint on every address is reached on loopback from its own host.
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() {
                        [127, 0, 0, 1].into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                format!("http://{addr}")
            }
            (None, None) if file.is_some() => return Err("the configuration has no [admin] section".into()),
            (None, None) => "http://127.0.0.1:7000".into(),
        };
        let token = self
            .token
            .clone()
            .or_else(|| file.as_ref().and_then(|c| c.admin_auth.token.as_ref().map(|t| t.expose().to_owned())));
        Ok((admin, token))
    }
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Run the agent (the default).
    Run,
    /// Maintenance on: proxies send no new connection to this node (open sessions stay). Kept
    /// across agent restarts until `resume`.
    Drain,
    /// Maintenance off.
    Resume,
    /// Fence the proxies before this node is promoted (Patroni's `pre_promote`, or before
    /// repmgr's promote command): exit 0 to let the promotion go on, non-zero to refuse it.
    PrePromote {
        /// How long to wait for every registered proxy to acknowledge (default: [pre_promote] timeout, 10s).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<Duration>,
        /// What to do when some proxy has not acknowledged in time.
        #[arg(long, value_enum)]
        on_timeout: Option<pgfront::config::agent::OnTimeout>,
        /// Lifetime of the fence request in etcd (whole seconds; default 60s).
        #[arg(long, value_parser = humantime::parse_duration)]
        hold: Option<Duration>,
        /// The node being promoted (default: this agent's node name).
        #[arg(long)]
        new_primary: Option<String>,
        /// The node to fence (default: every node other than the new primary).
        #[arg(long)]
        old_primary: Option<String>,
    },
}

#[derive(Subcommand)]
enum VipCmd {
    /// Remove every VIP of the configuration from its interface (for ExecStopPost after a
    /// crash, so two hosts never answer for one address). Exit 0 whether it was there or not.
    Release {
        #[arg(short, long, default_value = "/etc/pgfront/pgfront.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate a configuration file; exit 1 with the exact problem if it is invalid.
    Check {
        #[arg(short, long, default_value = "/etc/pgfront/pgfront.toml")]
        config: PathBuf,
        /// The file is an agent configuration (detected by its [node] section when not given).
        #[arg(long)]
        agent: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Config { cmd: ConfigCmd::Check { config, agent } } if agent || is_agent_file(&config) => {
            match pgfront::config::agent::AgentConfig::load(&config) {
                Ok(c) => {
                    if let Some(p) = pgfront::agent::state_file_problem(&c.state_file) {
                        eprintln!(
                            "{}: warning: state file unreadable (the agent stays drained): {p}",
                            config.display()
                        );
                    }
                    println!(
                        "{}: OK (agent {}, key {}, health on {})",
                        config.display(),
                        c.name,
                        c.node_key(),
                        c.api_listen
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Config { cmd: ConfigCmd::Check { config, .. } } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "{}: OK ({} cluster(s), {} listener(s), {} vip(s))",
                    config.display(),
                    c.clusters.len(),
                    c.listeners.len(),
                    c.vips.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "uring-experiment")]
        Cmd::UringRelay { routes, threads } => match pgfront::uring_relay::run(&routes, threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("uring relay: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Proxy { config } => {
            init_tracing();
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            // SAFETY: no other thread runs yet (the runtime starts below).
            let inherited = match unsafe { pgfront::app::InheritedSockets::from_systemd() } {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("sockets from systemd: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // The control plane (etcd, admin, VIPs, reloads): the data path has its own threads
            // (`proxy::workers`).
            let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(pgfront::app::run_with_signals(config, cfg, inherited)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Agent { config, cmd } => match cmd {
            None | Some(AgentCmd::Run) => {
                init_tracing();
                pgfront::agent::main_run(&config)
            }
            Some(AgentCmd::Drain) => pgfront::agent::main_maintenance(&config, true),
            Some(AgentCmd::Resume) => pgfront::agent::main_maintenance(&config, false),
            Some(AgentCmd::PrePromote { timeout, on_timeout, hold, new_primary, old_primary }) => {
                pgfront::agent::fence::main_pre_promote(
                    &config,
                    pgfront::agent::fence::PrePromoteArgs { timeout, on_timeout, hold, new_primary, old_primary },
                )
            }
        },
        Cmd::Status { admin, json } => status(&admin, json),
        Cmd::Drain { member, cluster, kill, admin } => {
            let query = if kill { "?kill=true" } else { "" };
            control(&admin, cluster.as_deref(), &member, &format!("drain{query}"))
        }
        Cmd::Resume { member, cluster, admin } => control(&admin, cluster.as_deref(), &member, "resume"),
        Cmd::Check { args } => pgfront::check::cli(args),
        Cmd::Vip { cmd: VipCmd::Release { config } } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut code = ExitCode::SUCCESS;
            for v in &cfg.vips {
                match rt.block_on(pgfront::vip::driver::release(v)) {
                    Ok(true) => println!("{}: removed {}/{} from {}", v.name, v.addr, v.prefix, v.interface),
                    Ok(false) => println!("{}: {}/{} was not on {}", v.name, v.addr, v.prefix, v.interface),
                    Err(e) => {
                        eprintln!("{e}");
                        code = ExitCode::FAILURE;
                    }
                }
            }
            code
        }
    }
}

/// An agent configuration has a `[node]` section and no `[[listener]]`; an unreadable file is
/// left to the proxy's loader, which reports it.
fn is_agent_file(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut buf = Vec::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(pgfront::config::MAX_CONFIG_SIZE).read_to_end(&mut buf));
    read.is_ok() && std::str::from_utf8(&buf).is_ok_and(pgfront::config::agent::looks_like_agent)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let ansi = std::io::stdout().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_ansi(ansi).init();
}

/// Sends a drain or resume to the admin endpoint and prints its answer: exit 0 when done, 1
/// when refused or unknown (the endpoint's one-line reason on stderr), 3 when it cannot be
/// reached.
fn control(args: &AdminArgs, cluster: Option<&str>, member: &str, action: &str) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(3);
        }
    };
    let (admin, token) = match args.resolve() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(3);
        }
    };
    let target = match cluster {
        Some(c) => format!("{c}/{member}"),
        None => member.to_owned(),
    };
    let url = format!("{}/members/{target}/{action}", admin.trim_end_matches('/'));
    let shown = pgfront::config::redact_userinfo(&url).into_owned();
    let bearer = token.as_ref().map(|t| format!("Bearer {t}"));
    let client = pgfront::http::client();
    let r = match rt.block_on(pgfront::http::post(&client, &url, bearer.as_deref(), Duration::from_secs(10))) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "pgfront: cannot reach the admin endpoint (is the proxy running, with [admin] listen there? \
                 --admin URL or -c FILE): {}",
                e.to_string().replace(&url, &shown)
            );
            return ExitCode::from(3);
        }
    };
    let body = String::from_utf8_lossy(&r.body);
    if r.status == 200 {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        println!("{}", v["message"].as_str().unwrap_or(body.trim()));
        return ExitCode::SUCCESS;
    }
    let why = body.trim();
    let hint = match r.status.as_u16() {
        403 if token.is_none() => {
            " (give the token with --token, PGFRONT_ADMIN_TOKEN, or -c the proxy's configuration)"
        }
        404 if why.starts_with("routes:") => " (is this a pgfront admin endpoint of this version?)",
        _ => "",
    };
    eprintln!("pgfront: {action_name} {member}: {why}{hint}", action_name = action.split('?').next().unwrap_or(action));
    ExitCode::FAILURE
}

fn status(admin: &str, json: bool) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(3);
        }
    };
    let url = format!("{}/status", admin.trim_end_matches('/'));
    // Messages name the URL without any user:password@ in it.
    let shown = pgfront::config::redact_userinfo(&url).into_owned();
    let client = pgfront::http::client();
    let body = match rt.block_on(pgfront::http::get(&client, &url, None, Duration::from_secs(5))) {
        Ok(r) if r.status == 200 => r.body,
        Ok(r) => {
            eprintln!("{shown}: HTTP {}", r.status);
            return ExitCode::from(3);
        }
        Err(e) => {
            eprintln!("{}", e.to_string().replace(&url, &shown));
            return ExitCode::from(3);
        }
    };
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    let v: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{shown}: {e}");
            return ExitCode::from(3);
        }
    };
    // The recent events, best effort: a proxy without `/events` (older) shows none.
    let events_url = format!("{}/events", admin.trim_end_matches('/'));
    let events: Vec<serde_json::Value> = rt
        .block_on(pgfront::http::get(&client, &events_url, None, Duration::from_secs(5)))
        .ok()
        .filter(|r| r.status == 200)
        .and_then(|r| serde_json::from_slice(&r.body).ok())
        .unwrap_or_default();
    print!("{}", render_status(&v, &events, std::time::SystemTime::now()));
    ExitCode::SUCCESS
}

/// How many recent events `pgfront status` shows.
const STATUS_EVENTS: usize = 8;

/// `pgfront status` as text, from `/status` and `/events` (pure: `now` places the events).
/// What needs action comes first and loud: a refused reload, a split brain, a fence, a primary
/// not routed (clients held), etcd unreachable.
fn render_status(v: &serde_json::Value, events: &[serde_json::Value], now: std::time::SystemTime) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    };
    let names = |v: &serde_json::Value| -> Vec<String> { v.as_array().into_iter().flatten().map(s).collect() };
    let mut out = String::new();
    let cfg = &v["config"];
    if cfg.is_object() {
        let _ = writeln!(out, "config {} revision {}", cfg["path"].as_str().unwrap_or("?"), cfg["revision"]);
        if let Some(e) = cfg["last_error"].as_str() {
            let _ = writeln!(out, "  last reload REFUSED (the previous configuration runs): {e}");
        }
    }
    for c in v["clusters"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "cluster {} (scope {}, source {}): etcd {}, primary {} ({})",
            s(&c["name"]),
            s(&c["scope"]),
            c["source"].as_str().unwrap_or("patroni"),
            if c["etcd_up"] == true { "up" } else { "UNREACHABLE" },
            s(&c["primary"]),
            s(&c["primary_status"])
        );
        if c["etcd_up"] != true {
            if let Some(e) = c["etcd_error"].as_str() {
                let _ = writeln!(out, "  etcd: {e}");
            }
        }
        let claimants = names(&c["split_brain"]);
        if !claimants.is_empty() {
            let _ = writeln!(
                out,
                "  SPLIT BRAIN: {} all claim primary; no new connection to either, their sessions closed",
                claimants.join(", ")
            );
        }
        if let Some(f) = c["fence"].as_object() {
            let fenced: Vec<String> = c["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["fenced"] == true)
                .map(|m| s(&m["name"]))
                .collect();
            let _ = writeln!(
                out,
                "  FENCE {} in force (promoting {}): no primary connection to {}",
                f.get("id").map_or_else(|| "-".into(), s),
                f.get("new_primary").map_or_else(|| "-".into(), s),
                if fenced.is_empty() { "-".into() } else { fenced.join(", ") }
            );
        }
        if let Some(p) = c["routing_paused_seconds"].as_f64() {
            let _ = writeln!(out, "  NO PRIMARY ROUTED for {p:.1} s: new primary clients are held in the queue");
        }
        let _ = writeln!(
            out,
            "  {:<16} {:<22} {:<10} {:<10} {:>4} {:>12}  PGFRONT",
            "MEMBER", "ADDRESS", "ROLE", "STATE", "TL", "LAG"
        );
        for m in c["members"].as_array().into_iter().flatten() {
            // What pgfront does with it; a drained or fenced member says so loudly.
            let lb = match (m["maintenance"] == true, m["maintenance_kill"] == true, m["fenced"] == true) {
                (_, _, true) => "FENCED (no primary connections)".to_owned(),
                (true, true, _) => "MAINTENANCE (drained, sessions closed)".to_owned(),
                (true, false, _) => "MAINTENANCE (drained, sessions kept)".to_owned(),
                _ => s(&m["server_state"]),
            };
            let _ = writeln!(
                out,
                "  {:<16} {:<22} {:<10} {:<10} {:>4} {:>12}  {}",
                s(&m["name"]),
                s(&m["addr"]),
                s(&m["role"]),
                s(&m["state"]),
                s(&m["timeline"]),
                s(&m["lag_bytes"]),
                lb
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "  {:<20} {:<22} {:<10} {:>6} {:>8}  SERVERS (active)",
        "LISTENER", "BIND", "ROLE", "QUEUED", "OLDEST"
    );
    for l in v["listeners"].as_array().into_iter().flatten() {
        let servers: Vec<String> = l["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|sv| format!("{}={}", s(&sv["member"]), s(&sv["active"])))
            .collect();
        let oldest = match l["oldest_queued_wait_seconds"].as_f64() {
            Some(w) if w > 0.0 => format!("{w:.1}s"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "  {:<20} {:<22} {:<10} {:>6} {:>8}  {}",
            s(&l["name"]),
            s(&l["bind"]),
            s(&l["role"]),
            s(&l["queued"]),
            oldest,
            servers.join(" ")
        );
    }
    if !events.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "recent events (newest last; all: /events):");
        // `/events` lists the newest first.
        for e in events.iter().take(STATUS_EVENTS).rev() {
            let at = e["at_ms"].as_u64().map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms));
            let ago = at.and_then(|t| now.duration_since(t).ok()).map_or_else(
                || "-".into(),
                |d| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string() + " ago",
            );
            let when = at.map_or_else(|| "-".into(), |t| humantime::format_rfc3339_seconds(t).to_string());
            let count = match e["count"].as_u64() {
                Some(n) if n > 1 => format!(" (x{n})"),
                _ => String::new(),
            };
            let _ = writeln!(out, "  {when} ({ago}) {}{count}", e["detail"].as_str().unwrap_or("-"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text_puts_what_needs_action_first() {
        let v = serde_json::json!({
            "config": {"path": "/etc/pgfront/pgfront.toml", "revision": 3, "last_error": "line 4: bad"},
            "clusters": [{
                "name": "main", "scope": "pg", "source": "agent", "etcd_up": false, "etcd_error": "connect: refused",
                "primary": null, "primary_status": "split_brain", "routing_paused_seconds": 2.04,
                "split_brain": ["pg1", "pg3"], "fence": {"id": "f-1", "new_primary": "pg2"},
                "members": [
                    {"name": "pg1", "addr": "127.0.0.1:5433", "role": "primary", "state": "running", "timeline": 2,
                     "lag_bytes": null, "fenced": true, "maintenance": false, "server_state": "down"},
                    {"name": "pg2", "addr": "127.0.0.1:5434", "role": "replica", "state": "running", "timeline": 2,
                     "lag_bytes": 0, "fenced": false, "maintenance": true, "maintenance_kill": false, "server_state": "maint"}
                ]
            }],
            "listeners": [{"name": "rw", "bind": "127.0.0.1:5432", "role": "primary", "queued": 4,
                           "oldest_queued_wait_seconds": 1.96, "servers": [{"member": "pg1", "active": 0}]}]
        });
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // Newest first, as `/events` lists them: ten, of which the 8 newest are shown, oldest first.
        let mut events =
            vec![serde_json::json!({"at_ms": 1_799_999_940_000u64, "count": 12, "detail": "refused: no primary"})];
        for i in 1..10u64 {
            events.push(
                serde_json::json!({"at_ms": 1_799_999_000_000u64 - i, "count": 1, "detail": format!("older {i}")}),
            );
        }
        let text = render_status(&v, &events, t0);
        assert!(text.contains("older 7") && !text.contains("older 8"), "the 8 newest: {text}");
        assert!(text.find("older 7") < text.find("refused: no primary"), "newest last: {text}");
        for want in [
            "last reload REFUSED (the previous configuration runs): line 4: bad",
            "cluster main (scope pg, source agent): etcd UNREACHABLE",
            "  etcd: connect: refused",
            "SPLIT BRAIN: pg1, pg3 all claim primary",
            "FENCE f-1 in force (promoting pg2): no primary connection to pg1",
            "NO PRIMARY ROUTED for 2.0 s",
            "FENCED (no primary connections)",
            "MAINTENANCE (drained, sessions kept)",
            "2.0s",
            "2027-01-15T07:59:00Z (1m ago) refused: no primary (x12)",
        ] {
            assert!(text.contains(want), "{want:?} missing in:\n{text}");
        }
        let quiet = serde_json::json!({"clusters": [{"name": "main", "etcd_up": true, "primary": "pg1",
            "primary_status": "routed", "split_brain": [], "fence": null, "routing_paused_seconds": null, "members": []}],
            "listeners": []});
        let text = render_status(&quiet, &[], t0);
        for alarm in ["SPLIT", "FENCE", "NO PRIMARY", "UNREACHABLE", "REFUSED", "recent events"] {
            assert!(!text.contains(alarm), "{alarm} in a quiet status:\n{text}");
        }
    }
}
