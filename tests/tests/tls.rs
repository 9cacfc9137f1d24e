//! The REST API over HTTPS: the real router behind the TLS listener with a self-signed
//! certificate, called through the CLI's client. Runs over the XDP program as
//! root, over the in-memory data plane otherwise (see `gatekeeper_tests::control`).

use std::{os::unix::fs::PermissionsExt as _, path::PathBuf, process::ExitCode, time::Duration};

use gatekeeper::{
    cli::{ClientCommand, Connection, Output, agent, run},
    control::auth::Tokens,
    daemon::http_router,
    tls::server_config,
};

const ADMIN: &str = "admin-token-0123456789";

struct Server {
    /// `https://127.0.0.1:PORT`
    url: String,
    dir: PathBuf,
    cert: PathBuf,
    _rt: tokio::runtime::Runtime,
}

impl Server {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gk-tls-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        let cert = dir.join("api.crt");
        let key = dir.join("api.key");
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

        let control = gatekeeper_tests::control::control(&dir.join("state.db"));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let tokens = Tokens::admin_reader(Some(ADMIN), None);
        let config = server_config(&cert, &key).expect("server config");
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let r = http_router(&control, &tokens, gatekeeper::config::DEFAULT_MAX_BODY_BYTES).unwrap();
        // The daemon's own server: TLS with its handshake timeout, header timeouts, the cap.
        rt.spawn(async move { gatekeeper::api::serve::serve(listener, Some(config), r).await });
        Self { url, dir, cert, _rt: rt }
    }

    fn connection(&self, ca_cert: Option<PathBuf>) -> Connection {
        Connection { api: self.url.clone(), token_file: None, ca_cert }
    }

    fn status(&self, ca_cert: Option<PathBuf>) -> Result<(u16, serde_json::Value), ureq::Error> {
        let agent = agent(&self.connection(ca_cert)).expect("agent");
        let mut resp = agent
            .get(format!("{}/api/v1/status", self.url))
            .header("Authorization", format!("Bearer {ADMIN}"))
            .call()?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        Ok((status, serde_json::from_str(&body).unwrap_or_default()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn cli_client_reaches_the_api_over_https_when_it_trusts_the_certificate() {
    let s = Server::start("trusted");
    let (status, body) = s.status(Some(s.cert.clone())).expect("https request with --ca-cert");
    assert_eq!(status, 200, "{body}");
    assert!(body["epoch"].is_number(), "{body}");

    // Error statuses come back as responses over TLS as well, as they do over plain http.
    let agent = agent(&s.connection(Some(s.cert.clone()))).unwrap();
    let resp = agent.get(format!("{}/api/v1/status", s.url)).call().expect("https request");
    assert_eq!(resp.status().as_u16(), 401);
}

#[test]
fn clients_that_do_not_trust_the_certificate_fail() {
    let s = Server::start("untrusted");
    // The system roots do not know a self-signed certificate.
    let e = s.status(None).expect_err("platform verifier must refuse a self-signed certificate");
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");

    // Another self-signed certificate as the CA does not vouch for this one.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let other_ca = s.dir.join("other.crt");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let e = s.status(Some(other_ca)).expect_err("a foreign CA must be refused");
    assert!(e.to_string().contains("invalid peer certificate"), "{e}");

    // Plain http to the TLS port gets no answer: the server wants a handshake.
    let agent = agent(&s.connection(None)).unwrap();
    assert!(agent.get(format!("{}/api/v1/status", s.url.replacen("https", "http", 1))).call().is_err());

    // The server still serves trusting clients after the failed handshakes.
    assert_eq!(s.status(Some(s.cert.clone())).expect("after failures").0, 200);
}

#[test]
fn a_stalled_handshake_does_not_block_other_clients() {
    let s = Server::start("stalled");
    let addr = s.url.trim_start_matches("https://").to_string();
    // Connections that never send a ClientHello hold their handshake tasks, not the listener.
    let _idle: Vec<std::net::TcpStream> = (0..8).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    // Half a ClientHello, then silence.
    let mut partial = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut partial, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let started = std::time::Instant::now();
    assert_eq!(s.status(Some(s.cert.clone())).expect("served while others stall").0, 200);
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

#[test]
fn the_cli_exits_3_when_tls_fails_and_refuses_an_unusable_ca_file() {
    let s = Server::start("cli");
    let token = s.dir.join("admin.token");
    std::fs::write(&token, ADMIN).unwrap();
    let status = || ClientCommand::Status { output: Output::Json };
    let conn = |ca_cert| Connection { token_file: Some(token.clone()), ..s.connection(ca_cert) };

    assert_eq!(run(&conn(Some(s.cert.clone())), status()), ExitCode::SUCCESS);
    // An untrusted certificate is "the API could not be reached".
    assert_eq!(run(&conn(None), status()), ExitCode::from(3));

    let bad = s.dir.join("bad.crt");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let e = agent(&s.connection(Some(bad.clone()))).map(|_| ()).unwrap_err().to_string();
    assert!(e.starts_with("--ca-cert ") && e.contains("bad.crt: no PEM certificate"), "{e}");
    assert_eq!(run(&conn(Some(bad)), status()), ExitCode::from(3));
    let missing = s.dir.join("missing.crt");
    let e = agent(&s.connection(Some(missing))).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("missing.crt: cannot read"), "{e}");
}
