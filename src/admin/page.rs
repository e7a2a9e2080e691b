//! The status page (`/`): what HAProxy's `stats uri` page gives, for pgfront's clusters. One
//! block per cluster with its leader highlighted and, per member, the role, state, timeline,
//! lag and each listener's connections against `server_maxconn`; each listener's queue, its
//! oldest waiting client and how long primary routing has been paused; the VIPs and who holds
//! them; the recent events.
//!
//! Invariants:
//! - **self-contained**: inline CSS and script, no external asset, so it works on a host with
//!   no internet access and leaks nothing to a third party;
//! - **server-rendered**: the whole content is in the HTML (readable with `curl`, `lynx`, or
//!   with scripts off). The script only refreshes it: every [`REFRESH_MS`] it fetches the same
//!   rendering of `<main>` (`/?part=main`) and swaps it in, so there is one renderer, here.
//!   When the endpoint stops answering the page says so and keeps the last data, marked stale;
//!   script errors are written into the page (`#script-errors`), where a test or a human sees
//!   them;
//! - **escaped**: every string that can come from etcd or the configuration (member, cluster,
//!   listener and VIP names, states, errors, event details) goes through [`esc`], in text or in
//!   double-quoted attributes only. The answer also carries a Content-Security-Policy that runs
//!   only the page's own script (by nonce), as a second line of defence;
//! - it reads `/status` as JSON (`serde_json::Value`), so a field added there (say a member's
//!   `maintenance`) is shown when present without this module knowing every type;
//! - readable on a phone: viewport meta, blocks that stack, tables that scroll sideways.

use std::fmt::Write;

use serde_json::Value;

use crate::events::Event;

/// How often the page refreshes itself.
pub(crate) const REFRESH_MS: u32 = 2000;

/// Events shown on the page (the newest); `/events` has the whole ring. Keeps each refresh
/// small (about 30 KiB) on a phone's connection.
pub(crate) const PAGE_EVENTS: usize = 100;

/// Escapes for HTML text and double- or single-quoted attributes.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A string field, escaped; `dash` when absent or null.
fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => esc(x),
        Some(Value::Number(n)) => n.to_string(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => "–".to_owned(),
    }
}

fn arr<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// `1.2 s`, `3 min 4 s`, `2 h 5 min`.
pub(crate) fn duration(secs: f64) -> String {
    let secs = secs.max(0.0);
    if secs < 10.0 {
        format!("{secs:.1} s")
    } else if secs < 60.0 {
        format!("{secs:.0} s")
    } else if secs < 3600.0 {
        format!("{} min {} s", (secs / 60.0) as u64, (secs % 60.0) as u64)
    } else {
        format!("{} h {} min", (secs / 3600.0) as u64, ((secs % 3600.0) / 60.0) as u64)
    }
}

/// Bytes of lag, in binary units.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A time of day (UTC) that the script turns into the browser's local time.
fn time(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    let iso = humantime::format_rfc3339_millis(t).to_string();
    let hms = iso.get(11..19).unwrap_or(&iso);
    format!("<time data-ms=\"{ms}\" title=\"{iso}\">{hms}Z</time>")
}

/// Words for `/status`'s `primary_status`.
fn primary_status_text(s: &str) -> &str {
    match s {
        "routable" => "routable",
        "no_leader" => "no leader",
        "leader_unknown" => "leader without a member entry",
        "leader_not_running" => "leader not running",
        "promoting" => "new leader promoting",
        "switchover_pending" => "switchover pending",
        "unconfirmed" => "etcd unreachable, primary unconfirmed",
        "read_only" => "primary read-only",
        other => other,
    }
}

const STYLE: &str = "\
:root{--ok:#0a7a2f;--bad:#b3261e;--warn:#8a5a00;--mute:#666;--line:#ddd;--lead:#e8f5e9;--bg:#fafafa}\
*{box-sizing:border-box}body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:var(--bg);color:#111}\
header{padding:10px 16px;background:#1d2b36;color:#eee;display:flex;flex-wrap:wrap;gap:4px 16px;align-items:baseline}\
header h1{font-size:18px;margin:0}header .meta{color:#bcc}#live{margin-left:auto;font-size:12px}#live.stale{color:#ffb4a9;font-weight:bold}\
main{padding:8px 16px 24px;display:grid;gap:14px;grid-template-columns:repeat(auto-fit,minmax(min(100%,560px),1fr))}\
section{background:#fff;border:1px solid var(--line);border-radius:6px;padding:10px 12px;min-width:0}\
section.wide{grid-column:1/-1}h2{font-size:16px;margin:0 0 6px}h2 small{color:var(--mute);font-weight:normal}\
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;margin:6px 0}\
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;white-space:nowrap;vertical-align:top}\
th{font-weight:600;color:#333;background:#f3f3f3}td.detail{white-space:normal;min-width:16em}\
tr.leader td{background:var(--lead);font-weight:600}.ok{color:var(--ok)}.bad{color:var(--bad);font-weight:600}.warn{color:var(--warn)}\
.mute{color:var(--mute)}.tag{display:inline-block;border-radius:3px;padding:0 5px;margin-left:4px;font-size:12px;font-weight:600;background:#eee}\
.tag.lead{background:var(--ok);color:#fff}.tag.maint{background:#f9a825;color:#000}.tag.bad{background:var(--bad);color:#fff}\
.p{display:block}.kv{display:flex;flex-wrap:wrap;gap:2px 14px;margin:2px 0 4px}\
#script-errors{background:#fdecea;color:var(--bad);margin:8px 16px;padding:6px 24px}\
footer{padding:0 16px 16px;color:var(--mute);font-size:12px}\
@media (max-width:600px){main{padding:6px}header{padding:8px}th,td{padding:3px 5px}table.ev tr:first-child{display:none}table.ev tr{display:block;border-bottom:1px solid var(--line);padding:3px 0}table.ev td{display:inline-block;border:0;padding:1px 4px}table.ev td.detail{display:block;min-width:0}table.ev .p{display:inline;margin-right:6px}}";

/// The page's script: it records script errors into the page, shows times in the browser's
/// time zone, and swaps in a fresh `<main>` every `REFRESH_MS` (not while the tab is hidden).
const SCRIPT: &str = r#"(function(){
var errs=document.getElementById('script-errors');
function report(t){var li=document.createElement('li');li.textContent=String(t);errs.appendChild(li);errs.hidden=false;}
window.onerror=function(msg,src,line,col){report('script error: '+msg+' ('+line+':'+col+')');};
window.addEventListener('unhandledrejection',function(e){report('script error: '+(e.reason&&e.reason.message||e.reason));});
var live=document.getElementById('live'),main=document.getElementById('main'),n=0,last=Date.now();
function local(root){var ts=root.querySelectorAll('time[data-ms]');for(var i=0;i<ts.length;i++){var d=new Date(Number(ts[i].getAttribute('data-ms')));ts[i].textContent=d.toLocaleTimeString();}}
function refresh(){
 if(document.hidden)return;
 fetch('/?part=main',{cache:'no-store'}).then(function(r){if(!r.ok)throw new Error('HTTP '+r.status);return r.text();}).then(function(h){
  main.innerHTML=h;local(main);n++;last=Date.now();main.setAttribute('data-refreshes',String(n));
  live.className='';live.textContent='live, updated '+new Date(last).toLocaleTimeString();
 }).catch(function(e){live.className='stale';live.textContent='pgfront not answering ('+e.message+'): data from '+new Date(last).toLocaleTimeString();});
}
local(document);live.textContent='live, refreshing every REFRESH s';
setInterval(refresh,REFRESH_MS);
})();"#;

/// The whole page. `nonce`: the script's, as in the answer's Content-Security-Policy.
pub(crate) fn render(status: &Value, events: &[Event], nonce: &str) -> String {
    let mut h = String::with_capacity(16 << 10);
    h.push_str("<!doctype html><html lang=en><head><meta charset=utf-8>");
    h.push_str("<meta name=viewport content=\"width=device-width,initial-scale=1\">");
    let title = match status_line(status) {
        Some(bad) => format!("pgfront: {bad}"),
        None => "pgfront".to_owned(),
    };
    let _ = write!(h, "<title>{}</title><style>{STYLE}</style></head><body>", esc(&title));
    let _ = write!(
        h,
        "<header><h1>pgfront {}</h1><span class=meta>pid {}</span>",
        text(status, "version"),
        text(status, "pid")
    );
    let _ = write!(h, "<span id=live class=mute>static page (no script)</span></header>");
    h.push_str("<ul id=script-errors hidden></ul>");
    h.push_str("<main id=main>");
    h.push_str(&main(status, events));
    h.push_str("</main>");
    h.push_str(
        "<footer>JSON: <a href=\"/status\">/status</a> · <a href=\"/events\">/events</a> · \
         <a href=\"/metrics\">/metrics</a> · <a href=\"/health\">/health</a></footer>",
    );
    let script =
        SCRIPT.replace("REFRESH_MS", &REFRESH_MS.to_string()).replace("REFRESH s", &format!("{} s", REFRESH_MS / 1000));
    let _ = write!(h, "<script nonce=\"{}\">{script}</script></body></html>", esc(nonce));
    h
}

/// What is wrong, in a few words, for the title (a browser tab shows it): `None` when every
/// cluster has a routable primary.
fn status_line(status: &Value) -> Option<String> {
    let bad: Vec<String> = arr(status, "clusters")
        .iter()
        .filter(|c| c.get("primary").is_none_or(Value::is_null))
        .map(|c| format!("{} has no primary", s(c, "name").unwrap_or("?")))
        .collect();
    (!bad.is_empty()).then(|| bad.join(", "))
}

/// The content of `<main>`: what the script refreshes.
pub(crate) fn main(status: &Value, events: &[Event]) -> String {
    let mut h = String::with_capacity(16 << 10);
    let listeners = arr(status, "listeners");
    for c in arr(status, "clusters") {
        cluster(&mut h, c, listeners);
    }
    if arr(status, "clusters").is_empty() {
        h.push_str("<section><h2>no cluster</h2><p class=mute>The configuration has no cluster.</p></section>");
    }
    vips(&mut h, arr(status, "vips"));
    config(&mut h, status.get("config").unwrap_or(&Value::Null));
    event_list(&mut h, events);
    h
}

fn cluster(h: &mut String, c: &Value, all_listeners: &[Value]) {
    let name = s(c, "name").unwrap_or("");
    let listeners: Vec<&Value> = all_listeners.iter().filter(|l| s(l, "cluster") == Some(name)).collect();
    let leader = s(c, "leader");
    let _ = write!(
        h,
        "<section class=\"cluster wide\" data-cluster=\"{}\"><h2>cluster {} <small>scope {}</small></h2>",
        esc(name),
        esc(name),
        text(c, "scope")
    );
    h.push_str("<div class=kv>");
    match s(c, "primary") {
        Some(p) => {
            let _ = write!(h, "<span>primary <b class=ok data-primary=\"{}\">{}</b> routable</span>", esc(p), esc(p));
        }
        None => {
            let why = primary_status_text(s(c, "primary_status").unwrap_or(""));
            let paused = num(c, "routing_paused_seconds").map(|p| format!(" for {}", duration(p))).unwrap_or_default();
            let _ = write!(h, "<span class=bad data-primary=\"\">no primary routable{paused}: {}</span>", esc(why));
        }
    }
    let _ = write!(
        h,
        "<span>leader <b data-leader=\"{}\">{}</b></span>",
        esc(leader.unwrap_or("")),
        esc(leader.unwrap_or("none"))
    );
    if c.get("etcd_up").and_then(Value::as_bool) == Some(true) {
        let sessions: Vec<&str> =
            c.get("etcd_sessions").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
        if sessions.is_empty() {
            h.push_str("<span>etcd <span class=ok>up</span></span>");
        } else {
            let _ = write!(
                h,
                "<span>etcd <span class=ok title=\"read from {}\">up</span></span>",
                esc(&sessions.join(", "))
            );
        }
    } else {
        let _ = write!(
            h,
            "<span>etcd <span class=bad>unreachable</span> <span class=mute>{}</span></span>",
            text(c, "etcd_error")
        );
    }
    if c.get("switchover_pending").and_then(Value::as_bool) == Some(true) {
        h.push_str("<span class=warn>switchover pending</span>");
    }
    h.push_str("</div>");

    // Members, with each listener's connections to them.
    h.push_str(
        "<div class=scroll><table class=members><tr><th>member</th><th>role</th><th>state</th><th>TL</th><th>lag</th>",
    );
    for l in &listeners {
        let _ = write!(
            h,
            "<th title=\"active / server_maxconn\">{} <span class=mute>{}</span></th>",
            text(l, "name"),
            text(l, "role")
        );
    }
    h.push_str("</tr>");
    for m in arr(c, "members") {
        let mname = s(m, "name").unwrap_or("");
        let is_leader = leader == Some(mname);
        let _ = write!(
            h,
            "<tr{} data-member=\"{}\"><td>{}",
            if is_leader { " class=leader" } else { "" },
            esc(mname),
            esc(mname)
        );
        if is_leader {
            h.push_str("<span class=\"tag lead\">leader</span>");
        }
        if m.get("maintenance").and_then(Value::as_bool) == Some(true) {
            h.push_str("<span class=\"tag maint\">maintenance</span>");
        }
        if m.get("noloadbalance").and_then(Value::as_bool) == Some(true) {
            h.push_str("<span class=tag>noloadbalance</span>");
        }
        let _ = write!(h, "<div class=mute>{}</div></td>", text(m, "addr"));
        let role = s(m, "role").unwrap_or("");
        let state = s(m, "state").unwrap_or("");
        let state_cls = if state == "running" || state == "streaming" { "ok" } else { "warn" };
        let lag = m.get("lag_bytes").and_then(Value::as_u64).map_or_else(|| "–".to_owned(), bytes);
        let _ = write!(
            h,
            "<td>{}</td><td class={state_cls}>{}</td><td>{}</td><td>{lag}</td>",
            esc(role),
            esc(state),
            text(m, "timeline")
        );
        for l in &listeners {
            let maxconn = text(l, "server_maxconn");
            match arr(l, "servers").iter().find(|sv| s(sv, "member") == Some(mname)) {
                Some(sv) => {
                    let st = s(sv, "state").unwrap_or("");
                    let cls = match st {
                        "eligible" => "ok",
                        "draining" => "bad",
                        _ => "warn",
                    };
                    let _ =
                        write!(h, "<td>{} / {maxconn} <span class={cls}>{}</span></td>", text(sv, "active"), esc(st));
                }
                None => h.push_str("<td class=mute>–</td>"),
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</table></div>");

    // Listeners: queue, oldest wait, routing.
    if !listeners.is_empty() {
        h.push_str(
            "<div class=scroll><table class=listeners><tr><th>listener</th><th>bind</th><th>role</th><th>balance</th>\
             <th>active</th><th>queued</th><th>oldest wait</th><th>routing</th></tr>",
        );
        for l in &listeners {
            let active: u64 = arr(l, "servers").iter().filter_map(|sv| sv.get("active").and_then(Value::as_u64)).sum();
            let queued = l.get("queued").and_then(Value::as_u64).unwrap_or(0);
            let wait = num(l, "oldest_queued_wait_seconds").unwrap_or(0.0);
            let routing = match (s(l, "role"), num(l, "routing_paused_seconds")) {
                (Some("primary"), Some(p)) => format!("<span class=bad>paused for {}</span>", duration(p)),
                (Some("primary"), None) => "<span class=ok>routable</span>".to_owned(),
                _ => {
                    let n = arr(l, "servers").iter().filter(|sv| s(sv, "state") == Some("eligible")).count();
                    let cls = if n == 0 { "bad" } else { "ok" };
                    format!("<span class={cls}>{n} eligible</span>")
                }
            };
            let _ = write!(
                h,
                "<tr data-listener=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{active}</td><td{}>{queued}</td><td>{}</td><td>{routing}</td></tr>",
                text(l, "name"),
                text(l, "name"),
                text(l, "bind"),
                text(l, "role"),
                text(l, "balance"),
                if queued > 0 { " class=warn" } else { "" },
                if queued > 0 { duration(wait) } else { "–".to_owned() },
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("</section>");
}

fn vips(h: &mut String, vips: &[Value]) {
    if vips.is_empty() {
        return;
    }
    h.push_str(
        "<section class=vips><h2>VIPs</h2><div class=scroll><table><tr><th>vip</th><th>address</th><th>interface</th>\
         <th>this host</th><th>held by</th><th>priority</th><th>transitions</th></tr>",
    );
    for v in vips {
        let state = s(v, "state").unwrap_or("");
        let (cls, holder) = match state {
            "master" => ("ok", "<b>this host</b>".to_owned()),
            _ => (
                "mute",
                match s(v, "master_seen") {
                    Some(m) => esc(m),
                    None => "<span class=mute>unknown from here</span>".to_owned(),
                },
            ),
        };
        let _ = write!(
            h,
            "<tr data-vip=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td class={cls}>{}</td><td>{holder}</td><td>{}</td><td>{}</td></tr>",
            text(v, "name"),
            text(v, "name"),
            text(v, "address"),
            text(v, "interface"),
            esc(state),
            text(v, "priority"),
            text(v, "transitions"),
        );
    }
    h.push_str("</table></div></section>");
}

fn config(h: &mut String, c: &Value) {
    h.push_str("<section class=config><h2>configuration</h2><div class=kv>");
    let _ = write!(h, "<span>{}</span><span>revision {}</span>", text(c, "path"), text(c, "revision"));
    if let Some(t) = c.get("loaded_at").and_then(Value::as_u64) {
        let _ = write!(h, "<span>loaded {}</span>", time(t.saturating_mul(1000)));
    }
    h.push_str("</div>");
    if let Some(e) = s(c, "last_error") {
        let _ = write!(h, "<p class=bad>last reload refused (the running configuration stands): {}</p>", esc(e));
    }
    h.push_str("</section>");
}

fn event_list(h: &mut String, events: &[Event]) {
    let shown = &events[..events.len().min(PAGE_EVENTS)];
    let _ = write!(
        h,
        "<section class=\"events wide\"><h2>recent events <small>newest first, {} of {} kept \
         (all in <a href=\"/events\">/events</a>)</small></h2>",
        shown.len(),
        events.len()
    );
    if events.is_empty() {
        h.push_str("<p class=mute>nothing yet</p></section>");
        return;
    }
    h.push_str("<div class=scroll><table class=ev><tr><th>time</th><th>event</th><th>where</th><th>what</th></tr>");
    for e in shown {
        let kind = serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        let cls = match kind.as_str() {
            "routing_paused" | "refused" | "reload_failed" | "etcd_down" | "primary_check" => "bad",
            "leader_change" | "drain" | "vip" | "admin" => "warn",
            _ => "ok",
        };
        let place: Vec<String> = [&e.cluster, &e.listener, &e.member, &e.vip]
            .into_iter()
            .zip(["cluster", "listener", "member", "vip"])
            .filter_map(|(v, what)| v.as_ref().map(|v| format!("<span class=p>{what} {}</span>", esc(v))))
            .collect();
        let mut what = esc(&e.detail);
        if e.count > 1 {
            let _ = write!(what, " <b>×{}</b>", e.count);
            if let Some(last) = e.last_ms {
                let _ = write!(what, " <span class=mute>(last at {})</span>", time(last));
            }
        }
        let _ = write!(
            h,
            "<tr class=event data-kind=\"{kind}\" data-id=\"{}\"><td>{}</td><td class={cls}>{}</td><td>{}</td><td class=detail>{what}</td></tr>",
            e.id,
            time(e.at_ms),
            kind.replace('_', " "),
            place.concat(),
        );
    }
    h.push_str("</table></div></section>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventKind, NewEvent, Ring};

    const EVIL: &str = "<script>alert(1)</script>\"'&";

    fn status(member: &str) -> Value {
        serde_json::json!({
            "version": "0.1.0", "pid": 42,
            "config": {"path": "/etc/pgfront/pgfront.toml", "revision": 3, "loaded_at": 1_700_000_000u64,
                       "last_reload": null, "last_error": format!("bad {EVIL}")},
            "clusters": [{
                "name": "main", "scope": EVIL, "etcd_up": false, "etcd_error": EVIL, "leader": member,
                "primary": null, "primary_status": "switchover_pending", "switchover_pending": true,
                "routing_paused_seconds": 12.4,
                "members": [
                    {"name": member, "addr": "127.0.0.1:5432", "role": "primary", "state": EVIL, "timeline": 3,
                     "lag_bytes": 0, "noloadbalance": false},
                    {"name": "pg2", "addr": null, "role": "replica", "state": "streaming", "timeline": 3,
                     "lag_bytes": 3_145_728u64, "noloadbalance": false, "maintenance": true}
                ]
            }],
            "listeners": [
                {"name": "rw", "bind": "127.0.0.1:5000", "cluster": "main", "role": "primary", "balance": "leastconn",
                 "server_maxconn": 100, "queued": 2, "oldest_queued_wait_seconds": 3.25, "routing_paused_seconds": 12.4,
                 "servers": [{"member": member, "addr": "127.0.0.1:5432", "active": 7, "state": "kept"}]},
                {"name": "ro", "bind": "127.0.0.1:5001", "cluster": "main", "role": "replica", "balance": "leastconn",
                 "server_maxconn": 50, "queued": 0, "oldest_queued_wait_seconds": 0.0, "routing_paused_seconds": null,
                 "servers": [{"member": "pg2", "addr": "127.0.0.1:5433", "active": 1, "state": "eligible"}]}
            ],
            "vips": [{"name": "v", "address": "10.0.0.10/24", "interface": "eth0", "vrid": 51, "state": "backup",
                      "priority": 100, "master_seen": EVIL, "transitions": 2}]
        })
    }

    fn events() -> Vec<Event> {
        let mut r = Ring::new(16);
        r.handle_event(
            1_700_000_001_000,
            EventKind::LeaderChange,
            NewEvent {
                old: Some("pg1".into()),
                pause_ms: Some(1234),
                ..NewEvent::cluster("main", format!("pg1 → {EVIL}"))
            }
            .member(EVIL),
        );
        for t in 0..5 {
            r.handle_refusal(1_700_000_002_000 + t, "rw", "no_server", || "no primary".into());
        }
        r.list(None)
    }

    #[test]
    fn every_string_from_etcd_is_escaped() {
        let page = render(&status(EVIL), &events(), "n0nce");
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("\"'&\""));
        // The page's own script is the only one, and carries the nonce.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(page.contains("<script nonce=\"n0nce\">"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
        for forbidden in ["src=\"http", "href=\"http", "@import", "url("] {
            assert!(!page.contains(forbidden), "external asset {forbidden:?}");
        }
    }

    #[test]
    fn the_page_names_the_etcd_members_read_from_escaped() {
        let mut s = status("pg1");
        s["clusters"][0]["etcd_up"] = true.into();
        s["clusters"][0]["etcd_sessions"] = serde_json::json!(["http://10.0.1.11:2379", EVIL]);
        let page = render(&s, &events(), "x");
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(
            page.contains("title=\"read from http://10.0.1.11:2379, &lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;\">up</span>"),
            "{page}"
        );
    }

    #[test]
    fn the_page_shows_the_leader_routing_queue_vips_and_events() {
        let page = render(&status("pg1"), &events(), "x");
        assert!(page.contains("<meta name=viewport"));
        assert!(page.contains("<title>pgfront: main has no primary</title>"), "{page}");
        assert!(
            page.contains("<tr class=leader data-member=\"pg1\"><td>pg1<span class=\"tag lead\">leader</span>"),
            "{page}"
        );
        assert!(page.contains("<span class=\"tag maint\">maintenance</span>"));
        assert!(page.contains("no primary routable for 12 s: switchover pending"), "{page}");
        assert!(page.contains("<td>7 / 100 <span class=warn>kept</span></td>"), "{page}");
        assert!(
            page.contains("<td class=warn>2</td><td>3.2 s</td><td><span class=bad>paused for 12 s</span>"),
            "{page}"
        );
        assert!(page.contains("<td>1 eligible</td>") || page.contains("<span class=ok>1 eligible</span>"), "{page}");
        assert!(page.contains("3.0 MiB"));
        assert!(page.contains("last reload refused"));
        assert!(page.contains("data-kind=\"leader_change\""));
        assert!(page.contains("pg1 → "));
        assert!(page.contains("<b>×5</b>"), "{page}");
        assert!(
            page.contains("<time data-ms=\"1700000001000\" title=\"2023-11-14T22:13:21.000Z\">22:13:21Z</time>"),
            "{page}"
        );
    }

    #[test]
    fn a_routable_cluster_and_units() {
        let mut st = status("pg1");
        st["clusters"][0]["primary"] = "pg1".into();
        st["clusters"][0]["routing_paused_seconds"] = Value::Null;
        let page = main(&st, &[]);
        assert!(page.contains("primary <b class=ok data-primary=\"pg1\">pg1</b> routable"), "{page}");
        assert!(page.contains("nothing yet"));
        assert_eq!(
            (duration(0.04), duration(42.0), duration(125.0), duration(7300.0)),
            ("0.0 s".to_owned(), "42 s".to_owned(), "2 min 5 s".to_owned(), "2 h 1 min".to_owned())
        );
        assert_eq!((bytes(0), bytes(1536)), ("0 B".to_owned(), "1.5 KiB".to_owned()));
        // The newest PAGE_EVENTS only.
        let mut r = Ring::new(256);
        for i in 0..150 {
            r.handle_event(i, EventKind::Reload, NewEvent::default());
        }
        let page = main(&st, &r.list(None));
        assert_eq!(page.matches("<tr class=event").count(), PAGE_EVENTS);
        assert!(page.contains("data-id=\"150\"") && !page.contains("data-id=\"50\""));
        assert!(page.contains("100 of 150 kept"));
        // Fields the page does not know, or missing ones, do not break it.
        let page = main(&serde_json::json!({"clusters": [{"name": "x", "members": [{"name": 3}]}]}), &[]);
        assert!(page.contains("cluster x"));
    }
}
