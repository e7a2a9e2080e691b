//! `pgfront check`: a Nagios / Icinga plugin over the admin endpoint's `/status`, following the
//! monitoring-plugins guidelines: one status line `PGFRONT <CHECK> <STATE> - text | perfdata`
//! (the text before `|` kept within `STATUS_LINE_MAX` characters), details on the lines after it,
//! and the exit code 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
//!
//! The core is pure: `evaluate(check, observed, thresholds) -> Outcome` reads an already parsed
//! `/status` document (and the peers' for `vip`), and `render` turns the outcome into the
//! plugin's text. `cli` is the thin shell: argument parsing, the HTTP requests (concurrent, each
//! bounded by `--timeout`), printing, the exit code.
//!
//! Invariants:
//! - anything that is not a verdict on the proxy (bad arguments, `--help`, an unreachable or
//!   slow admin endpoint, a document that is not pgfront's `/status`) is UNKNOWN, never OK or
//!   CRITICAL: the monitoring system must not mistake a broken check for a broken proxy;
//! - threshold ranges have monitoring-plugins' exact semantics (`Range`): `10` alerts outside
//!   0..10, `10:` below 10, `~:10` above 10, `@5:10` inside 5..10, bounds inclusive;
//! - `/status` is read leniently (unknown fields ignored, new optional fields defaulted), so the
//!   plugin keeps working against a proxy one version older or newer; only `clusters` and
//!   `listeners` are required.

use std::fmt;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::http::{self, HttpError};

/// The default admin endpoint (the example configuration's `[admin] listen`).
pub(crate) const DEFAULT_ADMIN: &str = "http://127.0.0.1:7000";
/// The default bound on each request, in seconds: monitoring-plugins' plugins default to 10 s.
pub(crate) const DEFAULT_TIMEOUT_SECS: &str = "10";
/// The monitoring-plugins guidelines ask for a status line that fits a pager / a terminal.
pub(crate) const STATUS_LINE_MAX: usize = 80;
/// How much of an etcd or reload error goes into the status line (the rest is on later lines).
const ERROR_SHORT: usize = 40;

// ---------------------------------------------------------------------------------------------
// States, ranges, thresholds

/// A plugin state; the discriminant is the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum State {
    Ok = 0,
    Warning = 1,
    Critical = 2,
    Unknown = 3,
}

impl State {
    pub(crate) fn code(self) -> u8 {
        self as u8
    }

    pub(crate) fn word(self) -> &'static str {
        match self {
            State::Ok => "OK",
            State::Warning => "WARNING",
            State::Critical => "CRITICAL",
            State::Unknown => "UNKNOWN",
        }
    }

    /// monitoring-plugins' `max_state_alt`: CRITICAL > WARNING > UNKNOWN > OK.
    fn rank(self) -> u8 {
        match self {
            State::Ok => 0,
            State::Unknown => 1,
            State::Warning => 2,
            State::Critical => 3,
        }
    }

    pub(crate) fn worst(self, other: State) -> State {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

/// A monitoring-plugins threshold range: `[@]start:end`, `start` defaulting to 0 and `~` meaning
/// minus infinity, an empty `end` plus infinity. A value alerts when it lies outside
/// `start..=end`, or inside it with `@`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Range {
    /// `None`: minus infinity (`~`).
    pub start: Option<f64>,
    /// `None`: plus infinity (`10:`).
    pub end: Option<f64>,
    /// `@`: alert inside the range instead of outside.
    pub inside: bool,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CheckError {
    #[error("invalid range {text:?}: {reason}")]
    Range { text: String, reason: &'static str },
    #[error("{0}")]
    Args(String),
    #[error(transparent)]
    Http(#[from] HttpErrorText),
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: not a pgfront /status document: {reason}")]
    Json { url: String, reason: String },
}

/// `HttpError` as text (it holds no source worth keeping, and `CheckError` stays `Eq` for tests).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HttpErrorText(String);

impl From<HttpError> for CheckError {
    fn from(e: HttpError) -> CheckError {
        CheckError::Http(HttpErrorText(e.to_string()))
    }
}

fn parse_value(s: &str) -> Option<f64> {
    // Perl's $value_re: [-+]?[\d.]+ with an optional exponent; no "inf", "nan" or hex.
    let ok = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
        && s.chars().any(|c| c.is_ascii_digit());
    ok.then(|| s.parse::<f64>().ok()).flatten().filter(|v| v.is_finite())
}

impl FromStr for Range {
    type Err = CheckError;

    fn from_str(text: &str) -> Result<Range, CheckError> {
        let bad = |reason| CheckError::Range { text: text.to_owned(), reason };
        let s: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let (inside, s) = match s.strip_prefix('@') {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let (start, end) = match s.split_once(':') {
            None => {
                // `10`: 0..10. A lone `~` has no end: monitoring-plugins rejects it too.
                let end = parse_value(s).ok_or_else(|| bad("not a number"))?;
                (Some(0.0), Some(end))
            }
            Some((a, b)) => {
                if a.is_empty() && b.is_empty() {
                    return Err(bad("neither start nor end"));
                }
                let start = match a {
                    "~" => None,
                    "" => Some(0.0),
                    a => Some(parse_value(a).ok_or_else(|| bad("start is not a number or ~"))?),
                };
                let end = match b {
                    "" => None,
                    b => Some(parse_value(b).ok_or_else(|| bad("end is not a number"))?),
                };
                (start, end)
            }
        };
        if let (Some(a), Some(b)) = (start, end) {
            if a > b {
                return Err(bad("start is greater than end"));
            }
        }
        Ok(Range { start, end, inside, text: text.trim().to_owned() })
    }
}

impl Range {
    /// Whether `v` raises the alert this range stands for.
    pub(crate) fn alerts(&self, v: f64) -> bool {
        let within = self.start.is_none_or(|a| a <= v) && self.end.is_none_or(|b| v <= b);
        within == self.inside
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `-w` and `-c`. CRITICAL wins over WARNING.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Thresholds {
    pub warn: Option<Range>,
    pub crit: Option<Range>,
}

impl Thresholds {
    pub(crate) fn state(&self, v: f64) -> State {
        if self.crit.as_ref().is_some_and(|r| r.alerts(v)) {
            State::Critical
        } else if self.warn.as_ref().is_some_and(|r| r.alerts(v)) {
            State::Warning
        } else {
            State::Ok
        }
    }

    fn is_set(&self) -> bool {
        self.warn.is_some() || self.crit.is_some()
    }

    fn perf(&self, label: String, value: f64, uom: &'static str, min: Option<f64>, max: Option<f64>) -> Perf {
        Perf {
            label,
            value,
            uom,
            warn: self.warn.as_ref().map(Range::to_string).unwrap_or_default(),
            crit: self.crit.as_ref().map(Range::to_string).unwrap_or_default(),
            min,
            max,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the check reads: the subset of `/status` it needs

/// `/status` as the plugin reads it: a mirror of `admin::Status` with every field the checks do
/// not strictly need defaulted, so an older or newer proxy still parses. tests/check.rs reads the
/// real proxy's `/status` with it, which keeps the mirror honest.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct StatusJson {
    pub clusters: Vec<ClusterJson>,
    pub listeners: Vec<ListenerJson>,
    #[serde(default)]
    pub vips: Vec<VipJson>,
    /// `{revision, loaded_at, last_error}` once the proxy reports reloads.
    #[serde(default)]
    pub config: Option<ConfigJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ClusterJson {
    pub name: String,
    #[serde(default)]
    pub etcd_up: bool,
    #[serde(default)]
    pub etcd_error: Option<String>,
    #[serde(default)]
    pub leader: Option<String>,
    #[serde(default)]
    pub primary: Option<String>,
    #[serde(default)]
    pub primary_status: Option<String>,
    /// Nodes claiming primary together (agent keys).
    #[serde(default)]
    pub split_brain: Vec<String>,
    /// Seconds since primary routing was paused, if the proxy reports it.
    #[serde(default)]
    pub routing_paused_seconds: Option<f64>,
    #[serde(default)]
    pub members: Vec<MemberJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct MemberJson {
    pub name: String,
    #[serde(default)]
    pub role: Option<String>,
    #[serde(default)]
    pub lag_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ListenerJson {
    pub name: String,
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub server_maxconn: u32,
    #[serde(default)]
    pub queued: u64,
    /// Seconds the oldest queued client has waited, if the proxy reports it.
    #[serde(default)]
    pub oldest_queued_wait_seconds: Option<f64>,
    #[serde(default)]
    pub servers: Vec<ServerJson>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ServerJson {
    pub member: String,
    #[serde(default)]
    pub active: u64,
    #[serde(default)]
    pub state: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct VipJson {
    pub name: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub state: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct ConfigJson {
    #[serde(default)]
    pub revision: serde_json::Value,
    #[serde(default)]
    pub loaded_at: serde_json::Value,
    /// A string, or an object with a `message`; null when the last reload succeeded.
    #[serde(default)]
    pub last_error: serde_json::Value,
}

/// What one run of the plugin observed: this host's `/status`, and for `vip --peers` the other
/// load-balancer hosts' (or why a peer did not answer).
#[derive(Debug, Clone, Default)]
pub(crate) struct Observed {
    pub local: StatusJson,
    pub peers: Vec<(String, Result<StatusJson, String>)>,
}

// ---------------------------------------------------------------------------------------------
// Checks and their outcome

/// The sub-checks. Aliases are check_patroni's names where they mean the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Kind {
    /// A routable primary for every primary listener's cluster.
    #[value(alias = "cluster_has_leader")]
    Primary,
    /// Eligible replicas per replica / read-only listener (-w/-c on the count).
    #[value(alias = "cluster_has_replica")]
    Replicas,
    /// Clients waiting in each listener's queue (-w/-c on the count).
    Queue,
    /// Every cluster's etcd reachable.
    Etcd,
    /// This host's VIP states; with --peers, exactly one holder per VIP.
    Vip,
    /// Active sessions against server_maxconn per server (-w/-c in percent).
    Sessions,
    /// The last configuration reload succeeded.
    Config,
}

impl Kind {
    fn upper(self) -> &'static str {
        match self {
            Kind::Primary => "PRIMARY",
            Kind::Replicas => "REPLICAS",
            Kind::Queue => "QUEUE",
            Kind::Etcd => "ETCD",
            Kind::Vip => "VIP",
            Kind::Sessions => "SESSIONS",
            Kind::Config => "CONFIG",
        }
    }

    fn takes_thresholds(self) -> bool {
        matches!(self, Kind::Replicas | Kind::Queue | Kind::Sessions)
    }
}

/// A check with what narrows it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Check {
    pub kind: Kind,
    /// Only this cluster (its listeners for listener-based checks).
    pub cluster: Option<String>,
    /// Only this listener (and its cluster for cluster-based checks).
    pub listener: Option<String>,
    /// The state of a failed last reload (`config`).
    pub failed_reload: State,
}

#[cfg(test)]
impl Check {
    pub(crate) fn new(kind: Kind) -> Check {
        Check { kind, cluster: None, listener: None, failed_reload: State::Warning }
    }
}

/// One perfdata item, `'label'=value[UOM];warn;crit;min;max`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Perf {
    pub label: String,
    pub value: f64,
    pub uom: &'static str,
    pub warn: String,
    pub crit: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

impl fmt::Display for Perf {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        // Quotes in a label are doubled; `=` would end the label, so it becomes `_`.
        let label = self.label.replace('\'', "''").replace('=', "_");
        let mut s = format!(
            "'{label}'={}{};{};{};{};{}",
            num(self.value),
            self.uom,
            self.warn,
            self.crit,
            self.min.map(num).unwrap_or_default(),
            self.max.map(num).unwrap_or_default()
        );
        while s.ends_with(';') {
            s.pop();
        }
        f.write_str(&s)
    }
}

fn perf(
    label: String,
    value: f64,
    uom: &'static str,
    warn: &str,
    crit: &str,
    min: Option<f64>,
    max: Option<f64>,
) -> Perf {
    Perf { label, value, uom, warn: warn.into(), crit: crit.into(), min, max }
}

/// The verdict of one check: its state, the status-line parts (the worst first), the perfdata
/// and the detail lines shown after the status line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub state: State,
    pub parts: Vec<String>,
    pub perf: Vec<Perf>,
    pub details: Vec<String>,
}

impl Outcome {
    fn unknown(why: impl Into<String>) -> Outcome {
        let why = why.into();
        Outcome { state: State::Unknown, parts: vec![why], perf: Vec::new(), details: Vec::new() }
    }
}

/// Collects per-item verdicts into an `Outcome`: parts ordered worst first.
#[derive(Default)]
struct Verdicts {
    items: Vec<(State, String)>,
    perf: Vec<Perf>,
    details: Vec<String>,
}

impl Verdicts {
    fn add(&mut self, state: State, part: String) {
        self.details.push(format!("{}: {part}", state.word()));
        self.items.push((state, part));
    }

    fn finish(mut self, empty: &str) -> Outcome {
        if self.items.is_empty() {
            return Outcome::unknown(empty);
        }
        let state = self.items.iter().fold(State::Ok, |s, (i, _)| s.worst(*i));
        // Stable: items of equal state keep the order of the configuration.
        self.items.sort_by_key(|(s, _)| std::cmp::Reverse(s.rank()));
        // While something is wrong, the status line shows only what is wrong.
        let parts = self.items.iter().filter(|(s, _)| state == State::Ok || *s != State::Ok).map(|(_, p)| p.clone());
        Outcome { state, parts: parts.collect(), perf: self.perf, details: self.details }
    }
}

fn shorten(s: &str, max: usize) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let cut: String = one_line.chars().take(max.saturating_sub(3)).collect();
    format!("{}...", cut.trim_end())
}

/// The check's verdict on what was observed. Pure.
pub(crate) fn evaluate(check: &Check, obs: &Observed, th: &Thresholds) -> Outcome {
    if th.is_set() && !check.kind.takes_thresholds() {
        return Outcome::unknown(format!("{} takes no -w/-c", check.kind.upper().to_lowercase()));
    }
    if !th.is_set() && check.kind.takes_thresholds() {
        let example = match check.kind {
            Kind::Replicas => "-w 2: -c 1:",
            Kind::Queue => "-w 1 -c 20",
            _ => "-w 80 -c 95",
        };
        return Outcome::unknown(format!("{} needs -w and/or -c, e.g. {example}", check.kind.upper().to_lowercase()));
    }
    let s = &obs.local;
    if let Some(l) = &check.listener {
        if !s.listeners.iter().any(|x| &x.name == l) {
            return Outcome::unknown(format!("no listener named {l:?}"));
        }
    }
    if let Some(c) = &check.cluster {
        if !s.clusters.iter().any(|x| &x.name == c) {
            return Outcome::unknown(format!("no cluster named {c:?}"));
        }
    }
    let listener_in_scope = |l: &ListenerJson| {
        check.listener.as_ref().is_none_or(|n| &l.name == n) && check.cluster.as_ref().is_none_or(|c| &l.cluster == c)
    };
    let listeners: Vec<&ListenerJson> = s.listeners.iter().filter(|l| listener_in_scope(l)).collect();
    let cluster = |name: &str| s.clusters.iter().find(|c| c.name == name);
    match check.kind {
        Kind::Primary => primary(s, &listeners),
        Kind::Replicas => replicas(s, &listeners, th),
        Kind::Queue => queue(&listeners, th),
        Kind::Sessions => sessions(&listeners, th),
        Kind::Etcd => {
            let mut names: Vec<&str> = Vec::new();
            for c in &s.clusters {
                let wanted = check.cluster.as_ref().is_none_or(|n| &c.name == n)
                    && check.listener.as_ref().is_none_or(|_| listeners.iter().any(|l| l.cluster == c.name));
                if wanted {
                    names.push(&c.name);
                }
            }
            etcd(names.iter().filter_map(|n| cluster(n)))
        }
        Kind::Vip => vip(obs),
        Kind::Config => config(s, check.failed_reload),
    }
}

fn primary_reason(c: &ClusterJson) -> String {
    let leader = c.leader.as_deref().unwrap_or("?");
    match c.primary_status.as_deref() {
        Some("no_leader") => "no leader".into(),
        Some("leader_unknown") => format!("leader {leader} not a member"),
        Some("leader_not_running") => format!("leader {leader} not running"),
        Some("promoting") => format!("{leader} promoting"),
        Some("switchover_pending") => "switchover pending".into(),
        Some("split_brain") => format!("SPLIT BRAIN: {} all claim primary", c.split_brain.join(", ")),
        Some("maintenance") => format!("{leader} in maintenance"),
        Some("fenced") => format!("{leader} fenced for a promotion"),
        Some(other) => other.replace('_', " "),
        None => "none".into(),
    }
}

fn primary(s: &StatusJson, listeners: &[&ListenerJson]) -> Outcome {
    let mut v = Verdicts::default();
    let mut seen: Vec<&str> = Vec::new();
    for l in listeners.iter().filter(|l| l.role == "primary") {
        if seen.contains(&l.cluster.as_str()) {
            continue;
        }
        seen.push(&l.cluster);
        let Some(c) = s.clusters.iter().find(|c| c.name == l.cluster) else {
            v.add(State::Critical, format!("{}: not in /status", l.cluster));
            continue;
        };
        let routable = c.primary.is_some();
        v.perf.push(perf(
            format!("{}_has_primary", c.name),
            f64::from(u8::from(routable)),
            "",
            "",
            "@0",
            Some(0.0),
            Some(1.0),
        ));
        match &c.primary {
            Some(p) => v.add(State::Ok, format!("{}: {p}", c.name)),
            None => {
                let mut text = format!("{}: no primary ({})", c.name, primary_reason(c));
                if let Some(secs) = c.routing_paused_seconds {
                    text.push_str(&format!(", paused {}s", num(secs.max(0.0).round())));
                    v.perf.push(perf(format!("{}_paused", c.name), secs.max(0.0), "s", "", "", Some(0.0), None));
                }
                v.add(State::Critical, text);
            }
        }
    }
    v.finish("no primary listener to check")
}

fn replicas(s: &StatusJson, listeners: &[&ListenerJson], th: &Thresholds) -> Outcome {
    let mut v = Verdicts::default();
    let mut lag_done: Vec<&str> = Vec::new();
    for l in listeners.iter().filter(|l| l.role == "replica" || l.role == "read-only") {
        let c = s.clusters.iter().find(|c| c.name == l.cluster);
        let is_primary = |member: &str| {
            c.is_some_and(|c| {
                c.leader.as_deref() == Some(member)
                    || c.primary.as_deref() == Some(member)
                    || c.members.iter().any(|m| m.name == member && m.role.as_deref() == Some("primary"))
            })
        };
        let eligible: Vec<&str> = l
            .servers
            .iter()
            .filter(|sv| sv.state == "eligible" && !is_primary(&sv.member))
            .map(|sv| sv.member.as_str())
            .collect();
        let known = c.map(|c| c.members.iter().filter(|m| m.role.as_deref() == Some("replica")).count());
        let n = eligible.len() as f64;
        let state = th.state(n);
        v.perf.push(th.perf(format!("{}_healthy_replica", l.name), n, "", Some(0.0), known.map(|k| k as f64)));
        let names = if eligible.is_empty() { String::new() } else { format!(" ({})", eligible.join(", ")) };
        v.add(
            state,
            format!("{}: {} replica{}{names}", l.name, eligible.len(), if eligible.len() == 1 { "" } else { "s" }),
        );
        if let Some(c) = c.filter(|c| !lag_done.contains(&c.name.as_str())) {
            lag_done.push(&c.name);
            for m in c.members.iter().filter(|m| !is_primary(&m.name)) {
                if let Some(lag) = m.lag_bytes {
                    v.perf.push(perf(format!("{}_{}_lag", c.name, m.name), lag as f64, "B", "", "", Some(0.0), None));
                }
            }
        }
    }
    v.finish("no replica or read-only listener to check")
}

fn queue(listeners: &[&ListenerJson], th: &Thresholds) -> Outcome {
    let mut v = Verdicts::default();
    for l in listeners {
        let n = l.queued as f64;
        v.perf.push(th.perf(format!("{}_queued", l.name), n, "", Some(0.0), None));
        if let Some(wait) = l.oldest_queued_wait_seconds {
            v.perf.push(perf(format!("{}_oldest_wait", l.name), wait.max(0.0), "s", "", "", Some(0.0), None));
        }
        v.add(th.state(n), format!("{}: {} queued", l.name, l.queued));
    }
    v.finish("no listener to check")
}

fn sessions(listeners: &[&ListenerJson], th: &Thresholds) -> Outcome {
    let mut v = Verdicts::default();
    let mut busiest: Option<(f64, String)> = None;
    for l in listeners {
        if l.server_maxconn == 0 {
            v.add(State::Unknown, format!("{}: server_maxconn not reported", l.name));
            continue;
        }
        let max = f64::from(l.server_maxconn);
        for sv in &l.servers {
            let pct = (sv.active as f64 * 100.0 / max * 100.0).round() / 100.0;
            v.perf.push(th.perf(format!("{}_{}", l.name, sv.member), pct, "%", Some(0.0), Some(100.0)));
            v.perf.push(perf(
                format!("{}_{}_active", l.name, sv.member),
                sv.active as f64,
                "",
                "",
                "",
                Some(0.0),
                Some(max),
            ));
            let text = format!("{}/{} {}/{} ({}%)", l.name, sv.member, sv.active, l.server_maxconn, num(pct.round()));
            if busiest.as_ref().is_none_or(|(b, _)| pct > *b) {
                busiest = Some((pct, text.clone()));
            }
            v.add(th.state(pct), text);
        }
        if l.servers.is_empty() {
            v.details.push(format!("{}: no servers", l.name));
        }
    }
    if v.items.is_empty() && !listeners.is_empty() {
        // Nothing to connect to is the primary / replicas checks' business, not a session count.
        return Outcome { state: State::Ok, parts: vec!["no servers".into()], perf: v.perf, details: v.details };
    }
    let mut o = v.finish("no listener to check");
    if let (State::Ok, Some((_, b))) = (o.state, busiest) {
        // All fine: the busiest server says the most.
        o.parts = vec![format!("busiest {b}")];
    }
    o
}

fn etcd<'a>(clusters: impl Iterator<Item = &'a ClusterJson>) -> Outcome {
    let mut v = Verdicts::default();
    for c in clusters {
        v.perf.push(perf(
            format!("{}_etcd_up", c.name),
            f64::from(u8::from(c.etcd_up)),
            "",
            "",
            "@0",
            Some(0.0),
            Some(1.0),
        ));
        if c.etcd_up {
            v.add(State::Ok, format!("{}: etcd up", c.name));
        } else {
            let err = c.etcd_error.as_deref().unwrap_or("no error reported");
            v.details.push(format!("{}: {err}", c.name));
            v.add(State::Critical, format!("{}: etcd unreachable: {}", c.name, shorten(&etcd_brief(err), ERROR_SHORT)));
        }
    }
    v.finish("no cluster to check")
}

/// The telling part of a discovery error: gRPC's `message: "…"` when there is one, else the
/// text after `etcd at <endpoints>: ` (the endpoints are in the configuration already).
fn etcd_brief(err: &str) -> String {
    if let Some((_, rest)) = err.split_once("message: \"") {
        if let Some((msg, _)) = rest.split_once('"') {
            if !msg.trim().is_empty() {
                return msg.to_owned();
            }
        }
    }
    match err.strip_prefix("etcd at ").and_then(|r| r.split_once(": ")) {
        Some((_, rest)) => rest.to_owned(),
        None => err.to_owned(),
    }
}

/// `http://lb2:7000` → `lb2:7000`: enough to name a peer in a status line.
fn peer_name(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

fn vip(obs: &Observed) -> Outcome {
    let mut v = Verdicts::default();
    for (url, r) in &obs.peers {
        if let Err(e) = r {
            v.details.push(format!("peer {url}: {e}"));
            v.add(State::Warning, format!("peer {} unanswered", peer_name(url)));
        }
    }
    for x in &obs.local.vips {
        let master = x.state == "master";
        if obs.peers.is_empty() {
            v.perf.push(perf(
                format!("{}_master", x.name),
                f64::from(u8::from(master)),
                "",
                "",
                "",
                Some(0.0),
                Some(1.0),
            ));
            let state = if x.state == "master" || x.state == "backup" { State::Ok } else { State::Warning };
            let what = if state == State::Ok { x.state.clone() } else { format!("not in the election ({})", x.state) };
            v.add(state, format!("{}: {what}", x.name));
            continue;
        }
        let mut holders: Vec<&str> = Vec::new();
        if master {
            holders.push("this host");
        }
        for (url, r) in &obs.peers {
            if let Ok(p) = r {
                if p.vips.iter().any(|pv| pv.address == x.address && pv.state == "master") {
                    holders.push(peer_name(url));
                }
            }
        }
        v.perf.push(perf(format!("{}_holders", x.name), holders.len() as f64, "", "", "1:1", Some(0.0), None));
        let text = match holders.len() {
            0 => format!("{} held by no host", x.name),
            1 => format!("{} on {}", x.name, holders[0]),
            n => format!("{} held by {n} hosts ({})", x.name, holders.join(", ")),
        };
        v.details.push(format!("{} {}: this host {}", x.name, x.address, x.state));
        v.add(if holders.len() == 1 { State::Ok } else { State::Critical }, text);
    }
    if obs.local.vips.is_empty() {
        return Outcome::unknown("no VIP configured on this host");
    }
    v.finish("no VIP configured on this host")
}

fn json_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => Some(o.get("message").and_then(json_text).unwrap_or_else(|| v.to_string())),
        v => Some(v.to_string()),
    }
}

fn config(s: &StatusJson, failed: State) -> Outcome {
    let Some(c) = &s.config else {
        return Outcome {
            state: State::Ok,
            parts: vec!["reload status not reported".into()],
            perf: Vec::new(),
            details: Vec::new(),
        };
    };
    let mut v = Verdicts::default();
    let revision = json_text(&c.revision).unwrap_or_else(|| "?".into());
    if let Some(loaded) = json_text(&c.loaded_at) {
        v.details.push(format!("revision {revision} loaded at {loaded}"));
    }
    match json_text(&c.last_error) {
        None => {
            v.perf.push(perf("reload_failed".into(), 0.0, "", "", "", Some(0.0), Some(1.0)));
            v.add(State::Ok, format!("revision {revision}, last reload ok"));
        }
        Some(e) => {
            let (w, cr) = if failed == State::Critical { ("", "@1") } else { ("@1", "") };
            v.perf.push(perf("reload_failed".into(), 1.0, "", w, cr, Some(0.0), Some(1.0)));
            v.details.push(format!("last reload error: {e}"));
            v.add(failed, format!("reload failed: {}", shorten(&e, ERROR_SHORT)));
        }
    }
    v.finish("")
}

/// The plugin's output: the status line (text within `STATUS_LINE_MAX`, then ` | ` and the
/// perfdata), then the details, one per line.
pub(crate) fn render(kind: Kind, o: &Outcome) -> String {
    let head = format!("PGFRONT {} {} - ", kind.upper(), o.state.word());
    let mut line = head.clone();
    let total = o.parts.len();
    for (i, part) in o.parts.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let rest = total - i - 1;
        let more = if rest > 0 { format!(" +{rest} more") } else { String::new() };
        let fits = |extra: &str| line.chars().count() + sep.len() + part.chars().count() + extra.chars().count();
        if fits(&more) <= STATUS_LINE_MAX {
            line.push_str(sep);
            line.push_str(part);
            continue;
        }
        if i == 0 {
            // The first part alone is too long: cut it.
            let room = STATUS_LINE_MAX.saturating_sub(line.chars().count() + more.len());
            line.push_str(&shorten(part, room));
            line.push_str(&more);
        } else {
            line.push_str(&format!(" +{} more", total - i));
        }
        break;
    }
    if !o.perf.is_empty() {
        line.push_str(" | ");
        line.push_str(&o.perf.iter().map(Perf::to_string).collect::<Vec<_>>().join(" "));
    }
    line.push('\n');
    for d in &o.details {
        // A `|` in a detail line would start perfdata for Nagios.
        line.push_str(&d.replace('|', "/"));
        line.push('\n');
    }
    line
}

// ---------------------------------------------------------------------------------------------
// The I/O shell

#[derive(Parser, Debug)]
#[command(
    name = "pgfront check",
    no_binary_name = true,
    about = "Nagios / Icinga plugin: checks a running pgfront through its admin endpoint.",
    after_help = "Exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (endpoint unreachable or too slow, bad \
                  arguments, not a pgfront /status).\nRanges (-w/-c) as in monitoring-plugins: 10 (alert outside \
                  0..10), 10: (below 10), ~:10 (above 10), 5:10 (outside 5..10), @5:10 (inside 5..10)."
)]
struct Args {
    /// What to check.
    #[arg(value_enum)]
    check: Kind,
    /// Admin endpoint of the proxy on this host.
    #[arg(short = 'a', long, default_value = DEFAULT_ADMIN)]
    admin: String,
    /// WARNING range (replicas: count; queue: queued clients; sessions: percent of server_maxconn).
    #[arg(short, long, allow_hyphen_values = true)]
    warning: Option<String>,
    /// CRITICAL range.
    #[arg(short, long, allow_hyphen_values = true)]
    critical: Option<String>,
    /// Bound on each request in seconds (10, 2.5) or as a duration (500ms); UNKNOWN when it expires.
    #[arg(short, long, default_value = DEFAULT_TIMEOUT_SECS)]
    timeout: String,
    /// vip: admin endpoints of the other load-balancer hosts (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Only this cluster.
    #[arg(long)]
    cluster: Option<String>,
    /// Only this listener.
    #[arg(long)]
    listener: Option<String>,
    /// config: the state of a failed last reload.
    #[arg(long, value_enum, default_value = "warning")]
    failed_reload: State,
}

fn parse_timeout(s: &str) -> Result<Duration, CheckError> {
    let bad = || CheckError::Args(format!("--timeout {s:?}: seconds (10, 2.5) or a duration (500ms)"));
    let d = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 86_400.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err(bad()),
        Err(_) => humantime::parse_duration(s).map_err(|_| bad())?,
    };
    if d.is_zero() || d > Duration::from_secs(86_400) {
        return Err(bad());
    }
    Ok(d)
}

fn status_url(base: &str) -> Result<String, CheckError> {
    let base = base.trim_end_matches('/');
    if !base.starts_with("http://") {
        return Err(CheckError::Args(format!("{base:?}: the admin endpoint is plain http://host:port")));
    }
    Ok(format!("{base}/status"))
}

async fn fetch(client: &http::HttpClient, url: &str, timeout: Duration) -> Result<StatusJson, CheckError> {
    let r = http::get(client, url, None, timeout).await?;
    if r.status != 200 {
        return Err(CheckError::Status { url: url.to_owned(), status: r.status.as_u16() });
    }
    serde_json::from_slice(&r.body).map_err(|e| CheckError::Json { url: url.to_owned(), reason: e.to_string() })
}

/// Everything the check needs, fetched concurrently.
async fn observe(local: &str, peers: &[String], timeout: Duration) -> Result<Observed, CheckError> {
    let client = http::client();
    let local_url = status_url(local)?;
    let peer_urls = peers.iter().map(|p| status_url(p)).collect::<Result<Vec<_>, _>>()?;
    // Each request is bounded by `timeout` (connect included) and they run together, so the
    // whole check is too; a peer that times out is reported as such instead of failing it all.
    let local = fetch(&client, &local_url, timeout);
    let peers_all = futures_util::future::join_all(peer_urls.iter().map(|u| fetch(&client, u, timeout)));
    let (local, peer_results) = tokio::join!(local, peers_all);
    Ok(Observed {
        local: local?,
        peers: peers.iter().cloned().zip(peer_results.into_iter().map(|r| r.map_err(|e| e.to_string()))).collect(),
    })
}

impl CheckError {
    /// The error for the status line; the whole text goes on the next line.
    fn brief(&self) -> String {
        match self {
            // `http://h:p/status: client error (Connect): tcp connect error: Connection refused
            // (os error 111)`: the endpoint and the last cause say what happened.
            CheckError::Http(HttpErrorText(full)) => match (full.split_once(": "), full.rsplit_once(": ")) {
                (Some((url, _)), Some((_, last))) => {
                    let last = match last.find(" (os error ") {
                        Some(i) if last.ends_with(')') => &last[..i],
                        _ => last,
                    };
                    format!("{}: {last}", peer_name(url))
                }
                _ => full.clone(),
            },
            CheckError::Status { url, status } => format!("{}: HTTP {status}", peer_name(url)),
            CheckError::Json { url, .. } => format!("{}: not a pgfront /status document", peer_name(url)),
            e => e.to_string(),
        }
    }
}

fn unknown_text(kind: Option<Kind>, e: &CheckError) -> String {
    let head = match kind {
        Some(k) => format!("PGFRONT {} UNKNOWN - ", k.upper()),
        None => "PGFRONT UNKNOWN - ".to_owned(),
    };
    let full = e.to_string();
    let brief = e.brief();
    let room = STATUS_LINE_MAX.saturating_sub(head.len());
    let mut out = format!("{head}{}\n", shorten(&brief, room));
    if brief != full || full.chars().count() > room || full.contains('\n') {
        out.push_str(&full.replace('|', "/"));
        out.push('\n');
    }
    out
}

/// Runs the plugin on `args` (what follows `pgfront check`); returns its output and exit code.
pub(crate) fn run(args: Vec<String>) -> (String, State) {
    let a = match Args::try_parse_from(&args) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => (e.to_string(), State::Unknown),
                _ => {
                    let msg = e.render().to_string();
                    let first = msg.lines().next().unwrap_or("bad arguments").trim_start_matches("error: ");
                    let head = unknown_text(None, &CheckError::Args(first.to_owned()));
                    (format!("{head}{msg}"), State::Unknown)
                }
            };
        }
    };
    let kind = a.check;
    let prepared = (|| {
        let th = Thresholds {
            warn: a.warning.as_deref().map(str::parse::<Range>).transpose()?,
            crit: a.critical.as_deref().map(str::parse::<Range>).transpose()?,
        };
        let timeout = parse_timeout(&a.timeout)?;
        if !a.peers.is_empty() && kind != Kind::Vip {
            return Err(CheckError::Args("--peers applies to the vip check only".into()));
        }
        if !matches!(a.failed_reload, State::Warning | State::Critical) {
            return Err(CheckError::Args("--failed-reload is warning or critical".into()));
        }
        Ok((th, timeout))
    })();
    let (th, timeout) = match prepared {
        Ok(p) => p,
        Err(e) => return (unknown_text(Some(kind), &e), State::Unknown),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return (unknown_text(Some(kind), &CheckError::Args(format!("runtime: {e}"))), State::Unknown),
    };
    let peers: Vec<String> = a.peers.iter().map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()).collect();
    let obs = match rt.block_on(observe(&a.admin, &peers, timeout)) {
        Ok(o) => o,
        Err(e) => return (unknown_text(Some(kind), &e), State::Unknown),
    };
    let check = Check { kind, cluster: a.cluster, listener: a.listener, failed_reload: a.failed_reload };
    let o = evaluate(&check, &obs, &th);
    (render(kind, &o), o.state)
}

/// `pgfront check …`: prints the plugin output on stdout and exits with the plugin code.
pub fn cli(args: Vec<String>) -> ExitCode {
    let (text, state) = run(args);
    print!("{text}");
    ExitCode::from(state.code())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn r(s: &str) -> Range {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn th(w: Option<&str>, c: Option<&str>) -> Thresholds {
        Thresholds { warn: w.map(r), crit: c.map(r) }
    }

    #[test]
    fn range_forms_follow_monitoring_plugins() {
        // 10: outside 0..10
        let x = r("10");
        assert!(x.alerts(-1.0) && !x.alerts(0.0) && !x.alerts(10.0) && x.alerts(10.5));
        // 10: below 10
        let x = r("10:");
        assert!(x.alerts(9.99) && !x.alerts(10.0) && !x.alerts(1e12));
        // ~:10 above 10
        let x = r("~:10");
        assert!(!x.alerts(-1e12) && !x.alerts(10.0) && x.alerts(11.0));
        // 10:20 outside
        let x = r("10:20");
        assert!(x.alerts(9.0) && !x.alerts(10.0) && !x.alerts(20.0) && x.alerts(21.0));
        // @10:20 inside, bounds included
        let x = r("@10:20");
        assert!(!x.alerts(9.0) && x.alerts(10.0) && x.alerts(15.0) && x.alerts(20.0) && !x.alerts(20.1));
        // @5 inside 0..5; @0 exactly 0
        assert!(r("@5").alerts(0.0) && !r("@5").alerts(6.0));
        assert!(r("@0").alerts(0.0) && !r("@0").alerts(1.0));
        // :10 is 0:10; ~: never alerts, @~: always does
        assert_eq!(r(":10").start, Some(0.0));
        assert!(!r("~:").alerts(-1e300) && !r("~:").alerts(1e300));
        assert!(r("@~:").alerts(0.0));
        // negative and fractional bounds
        let x = r("-5.5:-1");
        assert!(x.alerts(0.0) && !x.alerts(-3.0) && x.alerts(-6.0));
        assert_eq!(r(" 1:2 ").to_string(), "1:2");
    }

    #[test]
    fn bad_ranges_are_refused() {
        for s in ["", "@", ":", "~", "abc", "5:1", "1:x", "x:1", "10::", "nan", "inf", "1:inf", "0x10", "@@1", "1,5"] {
            assert!(s.parse::<Range>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn critical_wins_over_warning() {
        let t = th(Some("2:"), Some("1:"));
        assert_eq!(t.state(3.0), State::Ok);
        assert_eq!(t.state(2.0), State::Ok);
        assert_eq!(t.state(1.0), State::Warning);
        assert_eq!(t.state(0.0), State::Critical);
        assert_eq!(Thresholds::default().state(1e9), State::Ok);
    }

    fn num_str() -> impl Strategy<Value = f64> {
        prop_oneof![(-1000i32..1000).prop_map(f64::from), (-1e6f64..1e6).prop_map(|v| (v * 1000.0).round() / 1000.0)]
    }

    proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,12}") {
            let _ = s.parse::<Range>();
        }

        #[test]
        fn start_end_ranges_alert_exactly_outside(
            a in num_str(), b in num_str(), v in num_str(), pick in 0u8..4, at in any::<bool>()
        ) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            // The bounds themselves, often: they are where an off-by-one would hide.
            let v = match pick { 0 => lo, 1 => hi, _ => v };
            let text = format!("{}{}:{}", if at { "@" } else { "" }, lo, hi);
            let range: Range = text.parse().unwrap();
            let inside = lo <= v && v <= hi;
            prop_assert_eq!(range.alerts(v), inside == at, "{} with {}", text, v);
            prop_assert_eq!(range.to_string(), text);
        }

        #[test]
        fn open_ranges(x in num_str(), v in num_str()) {
            prop_assert_eq!(format!("{x}:").parse::<Range>().unwrap().alerts(v), v < x);
            prop_assert_eq!(format!("~:{x}").parse::<Range>().unwrap().alerts(v), v > x);
            prop_assert_eq!(format!("@~:{x}").parse::<Range>().unwrap().alerts(v), v <= x);
        }

        #[test]
        fn plain_number_is_zero_to_number(x in 0i32..100000, v in num_str()) {
            let plain: Range = x.to_string().parse().unwrap();
            let explicit: Range = format!("0:{x}").parse().unwrap();
            prop_assert_eq!(plain.alerts(v), explicit.alerts(v));
        }

        #[test]
        fn reversed_bounds_are_refused(a in num_str(), d in 0.001f64..1e6) {
            let text = format!("{}:{}", a + d, a);
            prop_assert!(text.parse::<Range>().is_err() || a + d <= a);
        }
    }

    fn status(v: serde_json::Value) -> Observed {
        Observed { local: serde_json::from_value(v).unwrap(), peers: Vec::new() }
    }

    fn cluster(name: &str, primary: Option<&str>) -> serde_json::Value {
        json!({
            "name": name, "scope": "s", "etcd_up": true, "etcd_error": null,
            "leader": primary.or(Some("pg1")), "primary": primary,
            "primary_status": if primary.is_some() { "routable" } else { "no_leader" },
            "switchover_pending": false,
            "members": [
                {"name": "pg1", "role": "primary", "state": "running", "lag_bytes": 0},
                {"name": "pg2", "role": "replica", "state": "running", "lag_bytes": 0},
                {"name": "pg3", "role": "replica", "state": "running", "lag_bytes": 4096},
            ],
        })
    }

    fn listener(
        name: &str,
        cluster: &str,
        role: &str,
        queued: u64,
        servers: &[(&str, u64, &str)],
    ) -> serde_json::Value {
        let servers: Vec<_> = servers
            .iter()
            .map(|(m, a, s)| json!({"member": m, "addr": "127.0.0.1:1", "active": a, "state": s}))
            .collect();
        json!({"name": name, "bind": "127.0.0.1:5432", "cluster": cluster, "role": role, "balance": "leastconn",
               "server_maxconn": 10, "queued": queued, "servers": servers})
    }

    fn simple(primary: Option<&str>, replicas: &[&str], queued: u64, active: u64) -> Observed {
        let rs: Vec<(&str, u64, &str)> = replicas.iter().map(|m| (*m, 0, "eligible")).collect();
        let mut rw = vec![];
        if let Some(p) = primary {
            rw.push((p, active, "eligible"));
        }
        status(json!({
            "version": "0.1.0",
            "clusters": [cluster("main", primary)],
            "listeners": [listener("rw", "main", "primary", queued, &rw), listener("ro", "main", "replica", 0, &rs)],
            "vips": [],
        }))
    }

    fn eval(kind: Kind, obs: &Observed, t: &Thresholds) -> Outcome {
        evaluate(&Check::new(kind), obs, t)
    }

    #[test]
    fn primary_ok_and_critical() {
        let o = eval(Kind::Primary, &simple(Some("pg1"), &[], 0, 0), &th(None, None));
        assert_eq!(o.state, State::Ok);
        assert_eq!(
            render(Kind::Primary, &o).lines().next().unwrap(),
            "PGFRONT PRIMARY OK - main: pg1 | 'main_has_primary'=1;;@0;0;1"
        );

        let o = eval(Kind::Primary, &simple(None, &[], 0, 0), &th(None, None));
        assert_eq!(o.state, State::Critical);
        assert_eq!(o.parts, ["main: no primary (no leader)"]);

        let mut obs = simple(None, &[], 0, 0);
        obs.local.clusters[0].routing_paused_seconds = Some(12.4);
        obs.local.clusters[0].primary_status = Some("promoting".into());
        obs.local.clusters[0].leader = Some("pg2".into());
        let o = eval(Kind::Primary, &obs, &th(None, None));
        assert_eq!(o.parts, ["main: no primary (pg2 promoting), paused 12s"]);
        assert!(o.perf.iter().any(|p| p.to_string() == "'main_paused'=12.4s;;;0"), "{:?}", o.perf);

        let mut obs = simple(None, &[], 0, 0);
        obs.local.clusters[0].primary_status = Some("split_brain".into());
        obs.local.clusters[0].split_brain = vec!["pg2".into(), "pg3".into()];
        let o = eval(Kind::Primary, &obs, &th(None, None));
        assert_eq!(o.state, State::Critical);
        assert_eq!(o.parts, ["main: no primary (SPLIT BRAIN: pg2, pg3 all claim primary)"]);
    }

    #[test]
    fn primary_without_primary_listener_is_unknown() {
        let obs = status(json!({"clusters": [cluster("main", Some("pg1"))],
                                "listeners": [listener("ro", "main", "replica", 0, &[])]}));
        assert_eq!(eval(Kind::Primary, &obs, &th(None, None)).state, State::Unknown);
    }

    #[test]
    fn replicas_against_thresholds() {
        let t = th(Some("2:"), Some("1:"));
        let o = eval(Kind::Replicas, &simple(Some("pg1"), &["pg2", "pg3"], 0, 0), &t);
        assert_eq!((o.state, o.parts.clone()), (State::Ok, vec!["ro: 2 replicas (pg2, pg3)".to_owned()]));
        assert!(o.perf.iter().any(|p| p.to_string() == "'ro_healthy_replica'=2;2:;1:;0;2"), "{:?}", o.perf);
        assert!(o.perf.iter().any(|p| p.to_string() == "'main_pg3_lag'=4096B;;;0"), "{:?}", o.perf);
        assert_eq!(eval(Kind::Replicas, &simple(Some("pg1"), &["pg2"], 0, 0), &t).state, State::Warning);
        let o = eval(Kind::Replicas, &simple(Some("pg1"), &[], 0, 0), &t);
        assert_eq!((o.state, o.parts.clone()), (State::Critical, vec!["ro: 0 replicas".to_owned()]));
        // A kept (not eligible) replica does not count, nor does the primary behind a read-only listener.
        let obs = status(json!({"clusters": [cluster("main", Some("pg1"))],
            "listeners": [listener("ro", "main", "read-only", 0, &[("pg1", 0, "eligible"), ("pg2", 3, "kept")])]}));
        assert_eq!(eval(Kind::Replicas, &obs, &t).state, State::Critical);
    }

    #[test]
    fn threshold_checks_need_thresholds_and_others_refuse_them() {
        let obs = simple(Some("pg1"), &[], 0, 0);
        for k in [Kind::Replicas, Kind::Queue, Kind::Sessions] {
            let o = eval(k, &obs, &th(None, None));
            assert_eq!(o.state, State::Unknown, "{k:?}");
            assert!(o.parts[0].contains("needs -w and/or -c"), "{:?}", o.parts);
        }
        for k in [Kind::Primary, Kind::Etcd, Kind::Vip, Kind::Config] {
            assert_eq!(eval(k, &obs, &th(Some("1"), None)).state, State::Unknown, "{k:?}");
        }
    }

    #[test]
    fn queue_states() {
        let t = th(Some("0"), Some("5"));
        let o = eval(Kind::Queue, &simple(Some("pg1"), &[], 0, 0), &t);
        assert_eq!(o.state, State::Ok);
        assert_eq!(
            o.perf.iter().map(Perf::to_string).collect::<Vec<_>>(),
            ["'rw_queued'=0;0;5;0", "'ro_queued'=0;0;5;0"]
        );
        let o = eval(Kind::Queue, &simple(Some("pg1"), &[], 1, 0), &t);
        assert_eq!((o.state, o.parts.clone()), (State::Warning, vec!["rw: 1 queued".to_owned()]));
        assert_eq!(eval(Kind::Queue, &simple(Some("pg1"), &[], 6, 0), &t).state, State::Critical);
        // The oldest wait, when the proxy reports it.
        let mut obs = simple(Some("pg1"), &[], 1, 0);
        obs.local.listeners[0].oldest_queued_wait_seconds = Some(4.5);
        let o = eval(Kind::Queue, &obs, &t);
        assert!(o.perf.iter().any(|p| p.to_string() == "'rw_oldest_wait'=4.5s;;;0"), "{:?}", o.perf);
        // Narrowed to the other listener, the queue of rw is not looked at.
        let check = Check { listener: Some("ro".into()), ..Check::new(Kind::Queue) };
        assert_eq!(evaluate(&check, &simple(Some("pg1"), &[], 6, 0), &t).state, State::Ok);
        let check = Check { listener: Some("nope".into()), ..Check::new(Kind::Queue) };
        assert_eq!(evaluate(&check, &simple(Some("pg1"), &[], 6, 0), &t).state, State::Unknown);
    }

    #[test]
    fn sessions_in_percent_of_server_maxconn() {
        let t = th(Some("80"), Some("95"));
        let o = eval(Kind::Sessions, &simple(Some("pg1"), &["pg2"], 0, 5), &t);
        assert_eq!((o.state, o.parts.clone()), (State::Ok, vec!["busiest rw/pg1 5/10 (50%)".to_owned()]));
        assert!(o.perf.iter().any(|p| p.to_string() == "'rw_pg1'=50%;80;95;0;100"), "{:?}", o.perf);
        assert!(o.perf.iter().any(|p| p.to_string() == "'rw_pg1_active'=5;;;0;10"), "{:?}", o.perf);
        let o = eval(Kind::Sessions, &simple(Some("pg1"), &["pg2"], 0, 9), &t);
        assert_eq!((o.state, o.parts.clone()), (State::Warning, vec!["rw/pg1 9/10 (90%)".to_owned()]));
        assert_eq!(eval(Kind::Sessions, &simple(Some("pg1"), &[], 0, 10), &t).state, State::Critical);
    }

    #[test]
    fn etcd_states() {
        let mut obs = simple(Some("pg1"), &[], 0, 0);
        let o = eval(Kind::Etcd, &obs, &th(None, None));
        assert_eq!((o.state, o.parts.clone()), (State::Ok, vec!["main: etcd up".to_owned()]));
        obs.local.clusters[0].etcd_up = false;
        obs.local.clusters[0].etcd_error =
            Some("etcd http://127.0.0.1:2379: status: Unavailable, message: \"error trying to connect: tcp connect error: Connection refused (os error 111)\"".into());
        let o = eval(Kind::Etcd, &obs, &th(None, None));
        assert_eq!(o.state, State::Critical);
        assert_eq!(o.parts, ["main: etcd unreachable: error trying to connect: tcp connect..."]);
        assert!(o.details.iter().any(|d| d.contains("os error 111")), "the full error is on a detail line");
        obs.local.clusters[0].etcd_error = Some("etcd at http://127.0.0.1:2379: no answer within 2s".into());
        assert_eq!(eval(Kind::Etcd, &obs, &th(None, None)).parts, ["main: etcd unreachable: no answer within 2s"]);
        let line = render(Kind::Etcd, &o);
        assert!(line.lines().next().unwrap().split(" | ").next().unwrap().chars().count() <= STATUS_LINE_MAX);
    }

    fn vips(state: &str) -> serde_json::Value {
        json!([{"name": "rw", "address": "10.0.0.10/24", "interface": "eth0", "vrid": 51, "version": "V3",
                "state": state, "priority": 150, "master_seen": null, "transitions": 1, "garps_sent": 3, "bad_packets": 0}])
    }

    fn vip_host(state: &str) -> StatusJson {
        serde_json::from_value(json!({"clusters": [], "listeners": [], "vips": vips(state)})).unwrap()
    }

    #[test]
    fn vip_alone_reports_this_host() {
        let obs = Observed { local: vip_host("master"), peers: vec![] };
        let o = eval(Kind::Vip, &obs, &th(None, None));
        assert_eq!((o.state, o.parts.clone()), (State::Ok, vec!["rw: master".to_owned()]));
        let obs = Observed { local: vip_host("initialize"), peers: vec![] };
        assert_eq!(eval(Kind::Vip, &obs, &th(None, None)).state, State::Warning);
        let mut none = Observed { local: vip_host("master"), peers: vec![] };
        none.local.vips.clear();
        assert_eq!(eval(Kind::Vip, &none, &th(None, None)).state, State::Unknown);
    }

    #[test]
    fn vip_holders_across_peers() {
        let peer = |state: &str| ("http://lb2:7000".to_owned(), Ok(vip_host(state)));
        let one = Observed { local: vip_host("backup"), peers: vec![peer("master")] };
        let o = eval(Kind::Vip, &one, &th(None, None));
        assert_eq!((o.state, o.parts.clone()), (State::Ok, vec!["rw on lb2:7000".to_owned()]));
        assert_eq!(o.perf[0].to_string(), "'rw_holders'=1;;1:1;0");

        let two = Observed { local: vip_host("master"), peers: vec![peer("master")] };
        let o = eval(Kind::Vip, &two, &th(None, None));
        assert_eq!(
            (o.state, o.parts.clone()),
            (State::Critical, vec!["rw held by 2 hosts (this host, lb2:7000)".to_owned()])
        );

        let none = Observed { local: vip_host("backup"), peers: vec![peer("backup")] };
        let o = eval(Kind::Vip, &none, &th(None, None));
        assert_eq!((o.state, o.parts.clone()), (State::Critical, vec!["rw held by no host".to_owned()]));

        let gone =
            Observed { local: vip_host("master"), peers: vec![("http://lb2:7000".into(), Err("refused".into()))] };
        let o = eval(Kind::Vip, &gone, &th(None, None));
        assert_eq!((o.state, o.parts.clone()), (State::Warning, vec!["peer lb2:7000 unanswered".to_owned()]));
        // A peer VIP with another address is another VIP.
        let mut other = vip_host("master");
        other.vips[0].address = "10.0.0.11/24".into();
        let o = eval(
            Kind::Vip,
            &Observed { local: vip_host("backup"), peers: vec![("http://lb2:7000".into(), Ok(other))] },
            &th(None, None),
        );
        assert_eq!(o.state, State::Critical);
    }

    #[test]
    fn config_reload_states() {
        let obs = simple(Some("pg1"), &[], 0, 0);
        let o = eval(Kind::Config, &obs, &th(None, None));
        assert_eq!((o.state, o.parts.clone()), (State::Ok, vec!["reload status not reported".to_owned()]));
        let mut obs = obs;
        obs.local.config = Some(
            serde_json::from_value(json!({"revision": 3, "loaded_at": "2024-05-01T10:00:00Z", "last_error": null}))
                .unwrap(),
        );
        let o = eval(Kind::Config, &obs, &th(None, None));
        assert_eq!((o.state, o.parts.clone()), (State::Ok, vec!["revision 3, last reload ok".to_owned()]));
        obs.local.config = Some(
            serde_json::from_value(json!({"revision": 3, "loaded_at": 1714557600, "last_error": "pgfront.toml:7: listener[0].cluster: no [[cluster]] is named \"mian\""}))
                .unwrap(),
        );
        let o = eval(Kind::Config, &obs, &th(None, None));
        assert_eq!(o.state, State::Warning);
        assert!(o.parts[0].starts_with("reload failed: pgfront.toml:7"), "{:?}", o.parts);
        let check = Check { failed_reload: State::Critical, ..Check::new(Kind::Config) };
        assert_eq!(evaluate(&check, &obs, &th(None, None)).state, State::Critical);
        obs.local.config = Some(
            serde_json::from_value(json!({"revision": "ab12", "last_error": {"message": "bad", "at": 5}})).unwrap(),
        );
        assert_eq!(eval(Kind::Config, &obs, &th(None, None)).parts, ["reload failed: bad"]);
    }

    #[test]
    fn long_status_lines_are_cut_with_a_count() {
        let parts: Vec<String> = (0..12).map(|i| format!("listener-number-{i}: 0 replicas")).collect();
        let o = Outcome { state: State::Critical, parts, perf: vec![], details: vec![] };
        let text = render(Kind::Replicas, &o);
        let line = text.lines().next().unwrap();
        assert!(line.chars().count() <= STATUS_LINE_MAX, "{line}");
        assert!(line.starts_with("PGFRONT REPLICAS CRITICAL - listener-number-0: 0 replicas"), "{line}");
        assert!(line.ends_with(" more"), "{line}");
        let one = Outcome { state: State::Critical, parts: vec!["x".repeat(200)], perf: vec![], details: vec![] };
        assert!(render(Kind::Etcd, &one).lines().next().unwrap().chars().count() <= STATUS_LINE_MAX);
    }

    #[test]
    fn perfdata_labels_are_quoted() {
        let p = perf("it's=odd".into(), 1.5, "s", "", "", None, None);
        assert_eq!(p.to_string(), "'it''s_odd'=1.5s");
        assert_eq!(num(0.1 + 0.2), "0.3");
        assert_eq!(num(-3.0), "-3");
    }

    #[test]
    fn not_a_status_document() {
        assert!(serde_json::from_value::<StatusJson>(json!({"clusters": []})).is_err());
        assert!(serde_json::from_value::<StatusJson>(json!([1, 2])).is_err());
        assert!(serde_json::from_value::<StatusJson>(json!({"clusters": [], "listeners": [], "new_field": 1})).is_ok());
    }

    #[test]
    fn bad_arguments_are_unknown() {
        let run_args = |a: &[&str]| run(a.iter().map(|s| s.to_string()).collect());
        for args in [
            &["nosuch"][..],
            &[],
            &["queue", "-w", "5:1"],
            &["queue", "-w", "1", "--timeout", "0"],
            &["queue", "-w", "1", "--timeout", "soon"],
            &["primary", "--peers", "http://x:1"],
            &["primary", "--admin", "https://127.0.0.1:1"],
            &["primary", "--bogus"],
            &["config", "--failed-reload", "ok"],
            &["--help"],
        ] {
            let (text, state) = run_args(args);
            assert_eq!(state, State::Unknown, "{args:?}: {text}");
            assert!(!text.is_empty());
            if args != ["--help"] {
                assert!(text.starts_with("PGFRONT "), "{args:?}: {text}");
                assert!(text.lines().next().unwrap().chars().count() <= STATUS_LINE_MAX, "{text}");
            }
        }
        // A negative range must not be taken for an option.
        let (text, state) = run_args(&["queue", "-w", "-1:5", "--admin", "http://127.0.0.1:1"]);
        assert_eq!(state, State::Unknown);
        assert!(text.contains("127.0.0.1:1"), "got past argument parsing to the request: {text}");
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_timeout("2.5").unwrap(), Duration::from_millis(2500));
        assert_eq!(parse_timeout("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_timeout("-1").is_err() && parse_timeout("0").is_err() && parse_timeout("nan").is_err());
    }
}
