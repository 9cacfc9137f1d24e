//! Section 4: live membership through the REST API: PATCH latency (the response comes after the
//! change is enforced and recorded) and tag changes per second, at full policy size; and
//! `GET /status` latency while whole-policy applies run (it must not wait for them).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use gatekeeper::{
    compile::Timeouts,
    control::{Control, Enforcer, Handle, Store, auth::Tokens},
    daemon::http_router,
    dataplane::LoadOptions,
    policy::{AssetSpec, PolicyDocument, RuleSpec, Scalar, SegmentSpec},
};
use serde::{Deserialize, Serialize};

use crate::{Options, progress, synth};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Api {
    pub assets: usize,
    pub segments: usize,
    pub rules: usize,
    /// Back-to-back sequential PATCHes: round-trip ms, p50 and p99.
    pub patch_ms_p50: f64,
    pub patch_ms_p99: f64,
    pub patches: usize,
    /// Isolated PATCHes (40 ms apart): round-trip ms, p50 and p99.
    #[serde(default)]
    pub isolated_ms_p50: f64,
    #[serde(default)]
    pub isolated_ms_p99: f64,
    /// Concurrent clients: tag changes per second.
    pub clients: usize,
    pub changes_per_sec: f64,
    /// `GET /status` round trips while nothing else runs: ms, p50 and p99.
    #[serde(default)]
    pub status_idle_ms_p50: f64,
    #[serde(default)]
    pub status_idle_ms_p99: f64,
    /// `GET /status` round trips while whole-policy applies run: ms, p50, p99 and max.
    #[serde(default)]
    pub status_during_apply_ms_p50: f64,
    #[serde(default)]
    pub status_during_apply_ms_p99: f64,
    #[serde(default)]
    pub status_during_apply_ms_max: f64,
    #[serde(default)]
    pub status_during_apply_samples: usize,
    /// How long each of those whole-policy applies took (mean, ms).
    #[serde(default)]
    pub full_apply_ms: f64,
    /// A policy-file reload (SIGHUP's path) restating this many assets: ms, and `GET /status`
    /// p99 while it ran.
    #[serde(default)]
    pub reload_assets: usize,
    /// From reading the file to the reply, of which `reload_read_ms` reading and checking the
    /// file (without the control lock).
    #[serde(default)]
    pub reload_ms: f64,
    #[serde(default)]
    pub reload_read_ms: f64,
    #[serde(default)]
    pub status_during_reload_ms_p99: f64,
    #[serde(default)]
    pub status_during_reload_samples: usize,
}

const TOKEN: &str = "bench-admin-token-000000";

fn document(assets: usize, segments: usize, rules: usize) -> PolicyDocument {
    // The synthetic policy as a document, so it goes through the API's own path.
    let p = synth::policy(assets, segments, rules);
    PolicyDocument {
        assets: p
            .assets
            .iter()
            .map(|a| AssetSpec {
                name: a.name.clone(),
                ips: a.prefixes.iter().map(|n| n.addr().to_string()).collect(),
                tags: a.tags.iter().map(|(k, v)| (k.clone(), Scalar::Str(v.clone()))).collect(),
                description: None,
            })
            .collect(),
        segments: p
            .segments
            .iter()
            .map(|s| SegmentSpec {
                name: s.name.clone(),
                selector: s.selector.as_ref().map(ToString::to_string),
                cidrs: vec![],
                mode: s.mode,
                description: None,
            })
            .collect(),
        rules: p
            .rules
            .iter()
            .map(|r| RuleSpec {
                name: r.name.clone(),
                from: r.from.to_string(),
                to: r.to.to_string(),
                protocol: r.protocol,
                ports: r
                    .ports
                    .iter()
                    .map(
                        |&(lo, hi)| {
                            if lo == hi { Scalar::Int(i64::from(lo)) } else { Scalar::Str(format!("{lo}-{hi}")) }
                        },
                    )
                    .collect(),
                action: r.action,
                expires: None,
                description: None,
            })
            .collect(),
    }
}

pub fn run(opts: &Options) -> anyhow::Result<Api> {
    let (assets, segments, rules, patches, clients, per_client) =
        if opts.smoke { (1000, 10, 100, 20, 4, 10) } else { (100_000, 1000, 10_000, 300, 16, 200) };
    progress(&format!("API: {assets} assets, {segments} segments, {rules} rules"));
    let dir = std::env::temp_dir().join(format!("gk-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open(&dir.join("state.db"))?;
    let enforcer = Enforcer::with_options(LoadOptions::default(), Timeouts::default())?;
    let (control, _) = Control::prepare(store, None, None, "bench")?.enforce(enforcer)?;
    let control = Handle::new(control);
    let t = Instant::now();
    let doc = document(assets, segments, rules);
    control.lock().change(doc.clone(), &"bench".into(), "apply", false)?;
    progress(&format!("  loaded through the API path in {:.2} s", t.elapsed().as_secs_f64()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}/api/v1", listener.local_addr()?);
    let r =
        http_router(&control, &Tokens::admin_reader(Some(TOKEN), None), gatekeeper::config::DEFAULT_MAX_BODY_BYTES)?;
    rt.spawn(async move { axum::serve(listener, r).await });

    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let patch = |agent: &ureq::Agent, i: usize, seg: usize| -> anyhow::Result<()> {
        let body = format!(r#"{{"tags": {{"seg": "{seg}"}}}}"#);
        let resp = agent
            .patch(&format!("{base}/assets/asset-{i}"))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .content_type("application/merge-patch+json")
            .send(body.as_str())?;
        if resp.status() != 200 {
            anyhow::bail!("PATCH asset-{i}: {}", resp.status());
        }
        Ok(())
    };
    let mut lat = Vec::with_capacity(patches);
    for k in 0..patches {
        let i = k % assets;
        let t = Instant::now();
        patch(&agent, i, (k / assets + 1 + i) % segments)?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    fn pct(v: &mut [f64], p: f64) -> f64 {
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    }
    let (p50, p99) = (pct(&mut lat, 0.50), pct(&mut lat, 0.99));
    progress(&format!("  back-to-back PATCH: p50 {p50:.2} ms, p99 {p99:.2} ms"));
    let mut iso = Vec::new();
    for k in 0..patches / 3 {
        std::thread::sleep(std::time::Duration::from_millis(40));
        let i = (k * 7) % assets;
        let t = Instant::now();
        patch(&agent, i, (k + 2 + i) % segments)?;
        iso.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (i50, i99) = (pct(&mut iso, 0.50), pct(&mut iso, 0.99));
    progress(&format!("  isolated PATCH: p50 {i50:.2} ms, p99 {i99:.2} ms"));

    let t = Instant::now();
    let workers: Vec<(usize, ureq::Agent)> =
        (0..clients).map(|c| (assets / 2 + c * per_client, agent.clone())).collect();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = workers
            .iter()
            .map(|(base_i, agent)| {
                let patch = &patch;
                scope.spawn(move || -> anyhow::Result<()> {
                    for k in 0..per_client {
                        patch(agent, (base_i + k) % assets, (k + 3) % segments)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        }
        Ok(())
    })?;
    let rate = (clients * per_client) as f64 / t.elapsed().as_secs_f64();
    progress(&format!("  {clients} concurrent clients: {rate:.0} tag changes per second"));

    // GET /status, idle and while whole-policy applies run (a rule added and removed again:
    // every identity's entries are compiled and written). Side by side, in one run.
    let status = |agent: &ureq::Agent| -> anyhow::Result<f64> {
        let t = Instant::now();
        let resp = agent.get(&format!("{base}/status")).header("Authorization", &format!("Bearer {TOKEN}")).call()?;
        if resp.status() != 200 {
            anyhow::bail!("GET /status: {}", resp.status());
        }
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(status(&agent)?);
    }
    let (s50, s99) = (pct(&mut idle, 0.50), pct(&mut idle, 0.99));
    let applies = if opts.smoke { 2 } else { 6 };
    let (mut during, apply_ms) = status_while(&|| status(&agent), || {
        let t = Instant::now();
        for k in 0..applies {
            let mut next = doc.clone();
            if k % 2 == 0 {
                next.rules.push(RuleSpec {
                    name: "bench-full-apply".into(),
                    from: "any".into(),
                    to: doc.segments[0].name.clone(),
                    ..RuleSpec::default()
                });
            }
            control.lock().change(next, &"bench".into(), "apply", false)?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / f64::from(applies))
    })?;
    let samples = during.len();
    let (d50, d99) = (pct(&mut during, 0.50), pct(&mut during, 0.99));
    let dmax = during.iter().copied().fold(0.0, f64::max);
    progress(&format!(
        "  GET /status: idle p50 {s50:.2} ms, p99 {s99:.2} ms; during {applies} whole-policy applies ({apply_ms:.0} ms each) p50 {d50:.2} ms, p99 {d99:.2} ms, max {dmax:.2} ms over {samples} requests"
    ));

    // A policy file that restates every asset with one tag changed, reloaded as SIGHUP does:
    // the YAML file read and checked without the control lock, then merged into the stored
    // state and applied under it. Timed from the read to the reply.
    let mut file = PolicyDocument { assets: doc.assets.clone(), ..PolicyDocument::default() };
    for a in &mut file.assets {
        a.tags.insert("reloaded".into(), Scalar::Str("yes".into()));
    }
    let path = dir.join("policy.yaml");
    std::fs::write(&path, serde_saphyr::to_string(&file)?)?;
    let file_bytes = std::fs::metadata(&path)?.len();
    drop(file);
    let reload = || -> anyhow::Result<(f64, f64)> {
        let t = Instant::now();
        let (parsed, _) = gatekeeper::policy::read_file(&path)?;
        let read_ms = t.elapsed().as_secs_f64() * 1e3;
        control.lock().reload(parsed)?;
        Ok((read_ms, t.elapsed().as_secs_f64() * 1e3))
    };
    let (mut during_reload, (reload_read_ms, reload_ms)) = status_while(&|| status(&agent), reload)?;
    let reload_samples = during_reload.len();
    let r99 = pct(&mut during_reload, 0.99);
    progress(&format!(
        "  policy-file reload of {assets} assets ({:.1} MB of YAML): {reload_ms:.0} ms ({reload_read_ms:.0} ms reading and checking the file, without the lock); GET /status during it p99 {r99:.2} ms over {reload_samples} requests",
        file_bytes as f64 / 1e6
    ));
    drop(rt);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Api {
        assets,
        segments,
        rules,
        patch_ms_p50: p50,
        patch_ms_p99: p99,
        patches,
        isolated_ms_p50: i50,
        isolated_ms_p99: i99,
        clients,
        changes_per_sec: rate,
        status_idle_ms_p50: s50,
        status_idle_ms_p99: s99,
        status_during_apply_ms_p50: d50,
        status_during_apply_ms_p99: d99,
        status_during_apply_ms_max: dmax,
        status_during_apply_samples: samples,
        full_apply_ms: apply_ms,
        reload_assets: assets,
        reload_ms,
        reload_read_ms,
        status_during_reload_ms_p99: r99,
        status_during_reload_samples: reload_samples,
    })
}

/// Calls `status` every 2 ms while `work` runs on another thread (bounded: a minute); returns
/// the round trips (ms) and what `work` returned.
fn status_while<T: Send>(
    status: &(dyn Fn() -> anyhow::Result<f64> + Sync),
    work: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<(Vec<f64>, T)> {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let r = work();
            done.store(true, Ordering::Relaxed);
            r
        });
        let mut times = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut failed = None;
        while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
            match status() {
                Ok(ms) => times.push(ms),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let result = worker.join().map_err(|_| anyhow::anyhow!("work thread panicked"))??;
        if let Some(e) = failed {
            return Err(e);
        }
        if times.is_empty() {
            anyhow::bail!("no GET /status answered while the work ran");
        }
        Ok((times, result))
    })
}

impl Api {
    /// Whether the run measured a reload (results from before it did not).
    pub fn reload_samples_ok(&self) -> bool {
        self.reload_assets > 0
    }
}
