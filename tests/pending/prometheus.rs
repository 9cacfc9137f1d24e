//! The monitoring files in `deploy/`: the alerting rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`); every metric the Grafana dashboard and the alerts name is
//! one a live lab daemon exports; and a real Prometheus (Debian's `prometheus`, installed by
//! `cargo xtask setup`) scrapes the daemon, loads the rules and sees the daemon's own counts.
//! The lab tests need root (network namespaces, XDP); the promtool test does not.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use gatekeeper_tests::lab::{Daemon, Lab, Reach, Servers, gatekeeper_bin, in_netns};
use serde_json::Value;

/// The alerts `deploy/prometheus/alerts.yml` must define, no more and no fewer.
const ALERTS: &[&str] = &[
    "GatekeeperDown",
    "GatekeeperMapNearlyFull",
    "GatekeeperFlowTableNearlyFull",
    "GatekeeperPolicyApplyFailing",
    "GatekeeperPolicyApplyErrors",
    "GatekeeperNetskopeSyncFailing",
    "GatekeeperNetskopePushesPending",
    "GatekeeperDropsSpiking",
];

/// One protected segment (the PLC, enforce), the HMI labelled, and one rule between them.
const POLICY: &str = r#"
assets:
  - {name: hmi-1, ips: [10.0.0.1], tags: {role: hmi}}
  - {name: plc-1, ips: [10.0.0.11], tags: {role: plc}}
segments:
  - {name: hmi, selector: role=hmi, mode: label}
  - {name: plc, selector: role=plc, mode: enforce}
rules:
  - {name: hmi-modbus, from: hmi, to: plc, protocol: tcp, ports: [502]}
"#;

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(3);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate is in the workspace").to_path_buf()
}

fn alerts_path() -> PathBuf {
    repo().join("deploy/prometheus/alerts.yml")
}

fn dashboard_path() -> PathBuf {
    repo().join("deploy/grafana/gatekeeper.json")
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// The rules of alerts.yml (every group's).
fn alert_rules() -> anyhow::Result<Vec<Value>> {
    let doc: Value = serde_saphyr::from_str(&read(&alerts_path())?).context("parsing alerts.yml")?;
    let groups = doc["groups"].as_array().context("alerts.yml has no groups")?;
    Ok(groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect())
}

/// Runs a tool, failing if it cannot be started (with how to install it); returns whether it
/// succeeded and its stdout and stderr together.
fn tool(cmd: &str, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(repo())
        .output()
        .with_context(|| format!("running {cmd} (Debian package prometheus: `cargo xtask setup` installs it)"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

#[test]
fn alerts_pass_promtool() -> anyhow::Result<()> {
    let path = alerts_path();
    let path = path.to_str().context("a UTF-8 path")?;
    let (ok, out) = tool("promtool", &["check", "rules", path])?;
    println!("{out}");
    ensure!(ok, "promtool check rules failed:\n{out}");

    let rules = alert_rules()?;
    let found: usize = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("SUCCESS: ")?.strip_suffix(" rules found")?.parse().ok())
        .with_context(|| format!("no rule count in promtool's output:\n{out}"))?;
    assert_eq!(found, rules.len(), "promtool counts every rule of the file");
    let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(names, ALERTS.iter().copied().collect(), "the alerts defined");
    assert_eq!(found, ALERTS.len(), "every rule is one of the alerts (no recording rules, no duplicates)");
    for r in &rules {
        let name = r["alert"].as_str().unwrap_or("?");
        let severity = r["labels"]["severity"].as_str();
        assert!(matches!(severity, Some("critical" | "warning")), "{name}: severity critical or warning");
        for a in ["summary", "description"] {
            assert!(r["annotations"][a].as_str().is_some_and(|s| s.len() > 20), "{name}: a {a} that says what to do");
        }
    }

    let tests = repo().join("deploy/prometheus/alerts_test.yml");
    let (ok, out) = tool("promtool", &["test", "rules", tests.to_str().context("a UTF-8 path")?])?;
    println!("{out}");
    ensure!(ok, "promtool test rules failed:\n{out}");
    ensure!(out.contains("SUCCESS"), "promtool test rules did not report success:\n{out}");
    // The unit tests cover at least these, firing and quiet.
    let unit = read(&tests)?;
    for alert in ["GatekeeperMapNearlyFull", "GatekeeperDropsSpiking"] {
        assert!(unit.contains(&format!("alertname: {alert}")), "alerts_test.yml proves {alert} stays quiet");
        assert!(unit.contains(&format!("alertname=\"{alert}\", alertstate=\"firing\"")), "and that it fires");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Metric names in PromQL

/// PromQL keywords: operators spelled as words, modifiers, and the aggregations (which may take
/// `by (...)` before their parenthesis); other functions are told by the `(` after them.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
];

/// Words followed by a parenthesised list of label names, not of expressions.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// The metric names a PromQL expression (or a Grafana query) selects: identifiers
/// (`[a-zA-Z_:][a-zA-Z0-9_:]*`) outside strings, label matchers (`{...}`) and label lists
/// (`by (...)`, `on (...)`, ...), that are neither keywords nor functions (followed by `(`).
/// Grafana's `$variables` and `[$__rate_interval]` are skipped; numbers and durations too.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let (mut i, mut braces, mut brackets) = (0, 0usize, 0usize);
    // Set after a word of LABEL_LISTS until its parenthesis closes.
    let (mut label_list_pending, mut in_label_list) = (false, false);
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                // A string: up to the same quote, not escaped (raw strings have no escapes).
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' => {
                braces += 1;
                i += 1;
            }
            '}' => {
                braces = braces.saturating_sub(1);
                i += 1;
            }
            '[' => {
                brackets += 1;
                i += 1;
            }
            ']' => {
                brackets = brackets.saturating_sub(1);
                i += 1;
            }
            '(' => {
                if label_list_pending {
                    in_label_list = true;
                    label_list_pending = false;
                }
                i += 1;
            }
            ')' => {
                in_label_list = false;
                i += 1;
            }
            '$' => {
                // A Grafana variable: $name or ${name}.
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_{}:".contains(chars[i])) {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                // A number or a duration (5m, 1h30m, 1e3, 0x1f).
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let call = chars.get(j) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) {
                    label_list_pending = true;
                } else if braces == 0
                    && brackets == 0
                    && !in_label_list
                    && !call
                    && !KEYWORDS.contains(&word.to_lowercase().as_str())
                {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_of_promql() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"sum by (interface, verdict) (rate(gatekeeper_packets_total{instance=~"$instance", verdict="drop"}[$__rate_interval]))"#
        ),
        ["gatekeeper_packets_total"]
    );
    assert_eq!(
        names("histogram_quantile(0.99, sum by (le) (rate(gatekeeper_apply_duration_seconds_bucket[5m])))"),
        ["gatekeeper_apply_duration_seconds_bucket"]
    );
    assert_eq!(
        names("a_total / (b > 0) > 0.9 and on (instance, job) time() - c_seconds > 1800 unless up == 0"),
        ["a_total", "b", "c_seconds", "up"]
    );
    assert_eq!(names(r#"x{l="gatekeeper_not_a_metric"} offset 1h30m + 1e3 * y:recorded"#), ["x", "y:recorded"]);
    assert_eq!(names("topk(10, sum without (rule) (z)) > bool 2"), ["z"]);
    assert_eq!(
        names(
            r#"# a comment naming gatekeeper_nothing
        w"#
        ),
        ["w"]
    );
}

/// Every string under a key named `key`, anywhere in a JSON document.
fn strings_at(v: &Value, key: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_at(x, key, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| strings_at(x, key, out)),
        _ => {}
    }
}

/// The dashboard's panel queries (every `expr`).
fn dashboard_exprs() -> anyhow::Result<Vec<String>> {
    let dash: Value = serde_json::from_str(&read(&dashboard_path())?).context("parsing the dashboard")?;
    let mut exprs = Vec::new();
    strings_at(&dash["panels"], "expr", &mut exprs);
    ensure!(!exprs.is_empty(), "the dashboard has no queries");
    Ok(exprs)
}

/// The metric names the dashboard (panels and template variables) and the alerts select, each
/// with where it is used.
fn referenced_metrics() -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in dashboard_exprs()? {
        for n in metric_names(&e) {
            used.entry(n).or_default().insert("dashboard".into());
        }
    }
    // Template variables: `label_values(SELECTOR, label)`, of which only SELECTOR names metrics.
    let dash: Value = serde_json::from_str(&read(&dashboard_path())?)?;
    let mut definitions = Vec::new();
    strings_at(&dash["templating"], "definition", &mut definitions);
    for d in definitions {
        if let Some(args) = d.trim().strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
            let selector = args.rsplit_once(',').map_or(args, |(s, _)| s);
            for n in metric_names(selector) {
                used.entry(n).or_default().insert("dashboard variables".into());
            }
        }
    }
    for r in alert_rules()? {
        let expr = r["expr"].as_str().context("a rule without expr")?;
        for n in metric_names(expr) {
            used.entry(n).or_default().insert(format!("alert {}", r["alert"].as_str().unwrap_or("?")));
        }
    }
    Ok(used)
}

// ---------------------------------------------------------------------------------------------
// The lab daemon and its /metrics

/// A port free on loopback in the appliance namespace (new with the lab, so only what the test
/// started there listens).
fn free_port(lab: &Lab) -> anyhow::Result<u16> {
    in_netns(&lab.appliance, || -> std::io::Result<u16> {
        TcpListener::bind("127.0.0.1:0")?.local_addr().map(|a| a.port())
    })?
    .context("binding in the appliance namespace")
}

/// A lab (an HMI and a PLC) with the daemon's metrics listener on a free port (its address), the
/// daemon and the PLC's Modbus echo server.
fn lab_daemon() -> anyhow::Result<(Lab, String, Daemon, Servers)> {
    let lab = Lab::new(&[("hmi", 1), ("plc", 11)])?;
    let port = free_port(&lab)?;
    let metrics = format!("127.0.0.1:{port}");
    let gatekeeper = gatekeeper_bin()?;
    let daemon = lab.start_daemon_with(&gatekeeper, POLICY, &format!("\n[metrics]\nlisten = \"{metrics}\"\n"))?;
    let servers = Servers::start(lab.host("plc"), &[502], &[])?;
    Ok((lab, metrics, daemon, servers))
}

/// An allowed TCP connection (echoed) and a denied one (silent), so the counters have series of
/// both verdicts.
fn allowed_and_denied(lab: &Lab) -> anyhow::Result<()> {
    let (hmi, plc) = (lab.host("hmi"), lab.host("plc").addr(false));
    let allowed = hmi.tcp(plc, 502, LONG)?;
    assert_eq!(allowed, Reach::Echoed, "the rule allows Modbus from the HMI");
    let denied = hmi.tcp(plc, 503, SHORT)?;
    assert_eq!(denied, Reach::Silent, "no rule allows port 503");
    Ok(())
}

/// GET `url` from inside the appliance namespace (with `query` as `?query=`): status and body.
fn get(lab: &Lab, url: &str, query: Option<&str>) -> anyhow::Result<(u16, String)> {
    let (url, query) = (url.to_string(), query.map(str::to_string));
    in_netns(&lab.appliance, move || -> anyhow::Result<(u16, String)> {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut req = agent.get(&url);
        if let Some(q) = &query {
            req = req.query("query", q);
        }
        let mut resp = req.call().with_context(|| format!("GET {url}"))?;
        Ok((resp.status().as_u16(), resp.body_mut().read_to_string()?))
    })?
}

fn scrape(lab: &Lab, metrics: &str) -> anyhow::Result<String> {
    let (status, body) = get(lab, &format!("http://{metrics}/metrics"), None)?;
    ensure!(status == 200, "GET /metrics: {status} {body}");
    Ok(body)
}

/// The metric names in an exposition: those with samples, and those only declared (`# HELP`,
/// `# TYPE`). A histogram's samples count under the histogram's name as well.
fn exported(text: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut sampled, mut declared) = (BTreeSet::new(), BTreeSet::new());
    let mut histograms = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
            let mut words = rest.split_whitespace();
            if let Some(name) = words.next() {
                declared.insert(name.to_string());
                if line.starts_with("# TYPE ") && matches!(words.next(), Some("histogram" | "summary")) {
                    histograms.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            sampled.insert(line[..end].to_string());
        }
    }
    for h in &histograms {
        if ["_bucket", "_sum", "_count"].iter().any(|s| sampled.contains(&format!("{h}{s}"))) {
            sampled.insert(h.clone());
        }
    }
    (sampled, declared)
}

/// A referenced name with the histogram suffixes taken off (`_bucket`, `_sum`, `_count`), when
/// what remains is a histogram the text declares.
fn base_name(name: &str, declared: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && declared.contains(base)
        {
            return base.to_string();
        }
    }
    name.to_string()
}

/// Referenced names the exposition lacks: a Netskope metric may be only declared (its series
/// appear once the integration runs); `up` is Prometheus's own.
fn missing(used: &BTreeMap<String, BTreeSet<String>>, text: &str) -> Vec<String> {
    let (sampled, declared) = exported(text);
    used.iter()
        .filter(|(name, _)| name.as_str() != "up")
        .filter(|(name, _)| {
            let base = base_name(name, &declared);
            let netskope = base.starts_with("gatekeeper_netskope_");
            let ours = base.starts_with("gatekeeper_") || base.starts_with("process_");
            !ours || !(sampled.contains(&base) || netskope && declared.contains(&base))
        })
        .map(|(name, wher)| format!("{name} (used by {})", wher.iter().cloned().collect::<Vec<_>>().join(", ")))
        .collect()
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() -> anyhow::Result<()> {
    let used = referenced_metrics()?;
    assert!(used.contains_key("gatekeeper_packets_total") && used.contains_key("process_resident_memory_bytes"));
    let (lab, metrics, daemon, servers) = lab_daemon()?;
    allowed_and_denied(&lab)?;

    // Gauges sampled every few seconds (the flow table's fill) may be missing from the first
    // scrapes: scrape until only Netskope names (which no time brings without the integration)
    // are missing, for 15 s at most, then report whatever still is.
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut text, mut absent);
    loop {
        text = scrape(&lab, &metrics)?;
        absent = missing(&used, &text);
        if absent.iter().all(|n| n.starts_with("gatekeeper_netskope_")) || Instant::now() > deadline {
            break;
        }
        println!("not yet exported, scraping again: {absent:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        absent.is_empty(),
        "the dashboard and the alerts use {} metric(s) the daemon does not export:\n  {}\n\n/metrics:\n{text}",
        absent.len(),
        absent.join("\n  ")
    );
    drop(servers);
    daemon.stop()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A real Prometheus

/// A Prometheus server in the appliance namespace; killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` scraping `target` every second with alerts.yml loaded, storing into
    /// the lab's directory, and waits (20 s at most) until it is ready.
    fn start(lab: &Lab, target: &str, listen: &str) -> anyhow::Result<Self> {
        let config = lab.dir.join("prometheus.yml");
        let alerts = alerts_path();
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {alerts:?}\n\
                 scrape_configs:\n  - job_name: gatekeeper\n    static_configs:\n      - targets: [\"{target}\"]\n",
                alerts = alerts.display().to_string()
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log = lab.dir.join("prometheus.log");
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", lab.appliance))
            .arg("--")
            .arg("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", lab.dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting prometheus (Debian package prometheus: `cargo xtask setup` installs it)")?;
        let mut p = Self { child, url: format!("http://{listen}"), log };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", p.log());
            }
            if matches!(get(lab, &format!("{}/-/ready", p.url), None), Ok((200, _))) {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 20 s:\n{}", p.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/api/v1/<path>` (with `query`): the `data` of a successful answer.
    fn api(&self, lab: &Lab, path: &str, query: Option<&str>) -> anyhow::Result<Value> {
        let (status, body) = get(lab, &format!("{}/api/v1/{path}", self.url), query)?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("/api/v1/{path}: {status} {body}"))?;
        ensure!(v["status"] == "success", "/api/v1/{path} {query:?}: {status} {body}");
        Ok(v["data"].clone())
    }

    /// An instant query's result vector.
    fn query(&self, lab: &Lab, q: &str) -> anyhow::Result<Vec<Value>> {
        let data = self.api(lab, "query", Some(q))?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of a query that yields at most one series (`None`: no series).
    fn scalar(&self, lab: &Lab, q: &str) -> anyhow::Result<Option<f64>> {
        let result = self.query(lab, q)?;
        ensure!(result.len() <= 1, "{q}: more than one series: {result:?}");
        result
            .first()
            .map(|s| s["value"][1].as_str().context("a value")?.parse::<f64>().context("a number"))
            .transpose()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sum of `gatekeeper_packets_total{verdict="drop"}` in an exposition.
fn drops(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("gatekeeper_packets_total{") && l.contains("verdict=\"drop\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// `n` UDP datagrams from the HMI to a PLC port no rule allows: `n` drops, no retransmission.
fn denied_burst(lab: &Lab, n: usize) -> anyhow::Result<()> {
    in_netns(&lab.host("hmi").netns, move || -> std::io::Result<()> {
        let s = UdpSocket::bind("10.0.0.1:40001")?;
        for _ in 0..n {
            s.send_to(b"denied", "10.0.0.11:9999")?;
            // Paced, so no datagram waits on ARP resolution and is dropped by the kernel first.
            std::thread::sleep(Duration::from_millis(2))
        }
        Ok(())
    })?
    .context("sending the burst")
}

#[test]
fn real_prometheus_scrapes_the_daemon() -> anyhow::Result<()> {
    let (lab, metrics, daemon, servers) = lab_daemon()?;
    let prometheus_port = free_port(&lab)?;
    let prometheus = Prometheus::start(&lab, &metrics, &format!("127.0.0.1:{prometheus_port}"))?;

    allowed_and_denied(&lab)?;
    // The neighbours are resolved now (the TCP attempts did it; ARP passes as non_ip).
    std::thread::sleep(Duration::from_millis(200));
    let before = drops(&scrape(&lab, &metrics)?);
    const N: usize = 25;
    denied_burst(&lab, N)?;
    std::thread::sleep(Duration::from_millis(200));
    let after = drops(&scrape(&lab, &metrics)?);
    assert_eq!(after - before, N as f64, "the daemon counts each denied datagram once");

    // Prometheus catches up within a few scrapes: at most 30 s.
    let q = r#"sum(gatekeeper_packets_total{job="gatekeeper", verdict="drop"})"#;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = prometheus.scalar(&lab, q)?;
        let own = drops(&scrape(&lab, &metrics)?);
        if seen == Some(own) && own >= after && own > 0.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("Prometheus shows {seen:?} drops, the daemon {own} (after the burst {after}):\n{}", prometheus.log());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(prometheus.scalar(&lab, r#"up{job="gatekeeper"}"#)?, Some(1.0), "the target is up");

    // The rules are loaded and evaluate cleanly (health "unknown" until their first evaluation).
    let expected = alert_rules()?.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let data = prometheus.api(&lab, "rules", None)?;
        let groups = data["groups"].as_array().cloned().unwrap_or_default();
        let group = groups.iter().find(|g| g["name"] == "gatekeeper");
        let rules = group.and_then(|g| g["rules"].as_array().cloned()).unwrap_or_default();
        let healthy = rules.iter().filter(|r| r["health"] == "ok").count();
        if group.is_some() && rules.len() == expected && healthy == expected {
            break;
        }
        let bad: Vec<_> =
            rules.iter().filter(|r| r["health"] == "err").map(|r| (&r["name"], &r["lastError"])).collect();
        ensure!(bad.is_empty(), "rules failing to evaluate: {bad:?}");
        if Instant::now() > deadline {
            bail!("the gatekeeper group is not loaded healthy after 30 s: {groups:?}\n{}", prometheus.log());
        }
        std::thread::sleep(Duration::from_millis(250));
    }

    // Every dashboard query is valid PromQL, and those not about Netskope (no integration here)
    // select series, with Grafana's variables as a user with "All" selected has them.
    // rate() over the 5 s that stand for Grafana's $__rate_interval needs samples that far back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = prometheus.scalar(&lab, r#"count_over_time(up{job="gatekeeper"}[5s])"#)?;
        println!("samples of up in the last 5 s: {n:?}");
        if n.is_some_and(|n| n >= 4.0) {
            break;
        }
        ensure!(Instant::now() < deadline, "Prometheus scraped fewer than 4 times in 5 s within 20 s");
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut empty = Vec::new();
    for e in dashboard_exprs()? {
        let q = e.replace("$__rate_interval", "5s").replace("$instance", ".*").replace("$interface", ".*");
        let result = prometheus.query(&lab, &q).with_context(|| format!("the dashboard's query {e}"))?;
        if result.is_empty() && !e.contains("gatekeeper_netskope_") {
            empty.push(e);
        }
    }
    assert!(empty.is_empty(), "dashboard queries selecting nothing from a live daemon:\n  {}", empty.join("\n  "));

    drop(prometheus);
    drop(servers);
    daemon.stop()?;
    Ok(())
}
