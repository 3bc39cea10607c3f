//! Test harness: a real master on 127.0.0.1 port 0 with its config and
//! secrets in a temp dir, and raw protocol helpers. Every wait is bounded.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use switchyard::builds::Event;
use switchyard::store::BuildStore;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use switchyard::auth::Verifier;
use switchyard::client::{self, ClientSession, Credentials};
use switchyard::master::Master;
use switchyard::proto::{ClientHandshake, ServerHandshake};

pub mod requests;
#[allow(unused_imports)]
pub use requests::*;

/// The bound on any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Users as (name, password, services).
pub type UserSpec<'a> = (&'a str, &'a str, &'a [&'a str]);

pub fn config_text(extra_master: &str, users: &[UserSpec<'_>]) -> String {
    let mut s =
        format!("[master]\nlisten = \"127.0.0.1:0\"\nsecrets = \"secrets.toml\"\n{extra_master}\n");
    for (name, _, services) in users {
        let list: Vec<String> = services.iter().map(|s| format!("{s:?}")).collect();
        s.push_str(&format!(
            "\n[[user]]\nname = {name:?}\nservices = [{}]\n",
            list.join(", ")
        ));
    }
    s
}

pub fn secrets_text(users: &[UserSpec<'_>]) -> String {
    let mut s = String::from("[verifiers]\n");
    for (name, password, _) in users {
        let v = Verifier::from_password(password.as_bytes(), 4096).unwrap();
        s.push_str(&format!("{name:?} = {:?}\n", v.encode()));
    }
    s
}

/// A master running in this process.
pub struct TestMaster {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub master: Arc<Master>,
    pub shutdown: CancellationToken,
    pub served: tokio::task::JoinHandle<()>,
}

impl TestMaster {
    pub async fn start(extra_master: &str, users: &[UserSpec<'_>]) -> TestMaster {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("master.toml"),
            config_text(extra_master, users),
        )
        .unwrap();
        std::fs::write(dir.path().join("secrets.toml"), secrets_text(users)).unwrap();
        Self::start_in(dir).await
    }

    /// Starts a master on the files (and state) already in `dir`.
    pub async fn start_in(dir: tempfile::TempDir) -> TestMaster {
        let master = Arc::new(Master::load(&dir.path().join("master.toml")).await.unwrap());
        let listener = master.bind().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let served = {
            let (m, s) = (master.clone(), shutdown.clone());
            tokio::spawn(async move { m.serve(listener, s).await })
        };
        TestMaster {
            dir,
            addr,
            master,
            shutdown,
            served,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("master.toml")
    }

    /// Rewrites both files (not reloaded until [`TestMaster::reload`]).
    pub fn rewrite(&self, extra_master: &str, users: &[UserSpec<'_>]) {
        std::fs::write(self.config_path(), config_text(extra_master, users)).unwrap();
        std::fs::write(self.dir.path().join("secrets.toml"), secrets_text(users)).unwrap();
    }

    pub async fn login(
        &self,
        user: &str,
        password: &str,
        service: &str,
    ) -> Result<ClientSession, client::ClientError> {
        let creds = Credentials::new(user, password);
        within(
            "a login",
            client::connect(&self.addr.to_string(), service, &creds),
        )
        .await
    }

    /// Logs in to `ping` and checks one echo: the port serves this user.
    pub async fn assert_serves(&self, user: &str, password: &str) -> ClientSession {
        let mut s = self
            .login(user, password, "ping")
            .await
            .unwrap_or_else(|e| panic!("{user} should still be served: {e}"));
        assert_echo(&mut s, b"still here").await;
        s
    }

    pub async fn stop(self) {
        self.stop_keeping_files().await;
    }

    /// Logs in to `service` with fresh credentials and returns the device
    /// token the master issued.
    pub async fn login_token(&self, user: &str, password: &str, service: &str) -> Option<String> {
        let creds = Credentials::new(user, password);
        within(
            "a login",
            client::connect(&self.addr.to_string(), service, &creds),
        )
        .await
        .unwrap_or_else(|e| panic!("{user} cannot log in: {e}"));
        creds.device_token()
    }

    /// Stops the master and hands back its directory (config, secrets and
    /// state), to start another master on it.
    pub async fn stop_keeping_files(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        within("the master to stop", self.served).await.unwrap();
        // The last handle on the state database goes with the master.
        drop(self.master);
        self.dir
    }

    /// A gRPC channel to the master's port.
    pub async fn grpc(&self) -> tonic::transport::Channel {
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr)).unwrap();
        within("a gRPC connection", endpoint.connect())
            .await
            .unwrap()
    }
}

pub async fn assert_echo(s: &mut ClientSession, payload: &[u8]) {
    use futures_util::{SinkExt, StreamExt};
    within(
        "sending a frame",
        s.stream.send(bytes::Bytes::copy_from_slice(payload)),
    )
    .await
    .unwrap();
    let echo = within("an echo", s.stream.next())
        .await
        .expect("session closed")
        .unwrap();
    assert_eq!(&echo[..], payload);
}

/// Waits for a session to be closed by the master; fails if it is not
/// closed within `bound`.
pub async fn assert_hung_up(s: &mut ClientSession, bound: Duration) {
    use futures_util::StreamExt;
    match tokio::time::timeout(bound, s.stream.next()).await {
        Ok(None) | Ok(Some(Err(_))) => {}
        Ok(Some(Ok(f))) => panic!("expected a hang-up, got a frame {f:?}"),
        Err(_) => panic!("session was not hung up within {bound:?}"),
    }
}

/// A raw connection speaking the wire format by hand.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: within("connect", TcpStream::connect(addr)).await.unwrap(),
        }
    }

    /// Connects and sends the native magic.
    pub async fn native(addr: SocketAddr) -> Raw {
        let mut r = Self::connect(addr).await;
        r.write(b"SWYD/1\r\n").await;
        r
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        within("a write", self.stream.write_all(bytes))
            .await
            .unwrap();
    }

    pub async fn send(&mut self, msg: &ClientHandshake) {
        let body = msg.encode_to_vec();
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        self.write(&frame).await;
    }

    /// The next server message, or `None` if the master closed the connection.
    pub async fn recv(&mut self) -> Option<ServerHandshake> {
        let mut len = [0u8; 4];
        match within("a server frame", self.stream.read_exact(&mut len)).await {
            Ok(_) => {}
            Err(_) => return None,
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        within("a server frame body", self.stream.read_exact(&mut body))
            .await
            .unwrap();
        Some(ServerHandshake::decode(&body[..]).expect("a ServerHandshake"))
    }

    /// Reads everything until the master closes; panics if it does not.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = within(
            "the master to close the connection",
            self.stream.read_to_end(&mut out),
        )
        .await;
        out
    }
}

/// The `switchyard` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// A child process that is killed when the test ends, pass or fail.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a real `switchyard worker` process for the master, with its
/// basedir under the master's temp dir.
pub fn spawn_worker(m: &TestMaster, name: &str, password: &str, basedir: &str) -> Reaped {
    spawn_worker_with(m, name, password, basedir, &[], &[])
}

/// [`spawn_worker`] with more arguments and environment variables.
pub fn spawn_worker_with(
    m: &TestMaster,
    name: &str,
    password: &str,
    basedir: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Reaped {
    spawn_worker_to(
        &[m.addr.to_string()],
        name,
        password,
        &m.dir.path().join(basedir),
        args,
        env,
    )
}

/// A worker process logging in to `masters` (each given as `--master`, in
/// order), its basedir `basedir`.
pub fn spawn_worker_to(
    masters: &[String],
    name: &str,
    password: &str,
    basedir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> Reaped {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("worker");
    for m in masters {
        cmd.args(["--master", m]);
    }
    Reaped(
        cmd.args(["--name", name, "--basedir"])
            .arg(basedir)
            .args(args)
            .env("SWITCHYARD_PASSWORD", password)
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

// ---- build master helpers

/// Users every build test master has.
pub const HOOK: UserSpec = ("hook", "hook-pw", &["change-source"]);
pub const ADMIN: UserSpec = ("admin", "admin-pw", &["debug", "change-source"]);

pub fn worker(m: &TestMaster, name: &str, password: &str) -> Reaped {
    spawn_worker(m, name, password, &format!("basedir-{name}"))
}

/// Starts a master whose config has these workers (name, password,
/// max_builds) and this extra TOML (builders, schedulers).
pub async fn master_with(workers: &[(&str, &str, u32)], builds_toml: &str) -> TestMaster {
    master_with_secrets(workers, builds_toml, "").await
}

/// [`master_with`], and `extra_secrets` appended to the secrets file (e.g.
/// a `[step_secrets]` table).
pub async fn master_with_secrets(
    workers: &[(&str, &str, u32)],
    builds_toml: &str,
    extra_secrets: &str,
) -> TestMaster {
    master_configured("", workers, builds_toml, extra_secrets).await
}

/// [`master_with_secrets`], with `extra_master` lines in `[master]` (e.g.
/// a PostgreSQL `state`).
pub async fn master_configured(
    extra_master: &str,
    workers: &[(&str, &str, u32)],
    builds_toml: &str,
    extra_secrets: &str,
) -> TestMaster {
    let users = [HOOK, ADMIN];
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_text(
        &format!("heartbeat_interval = \"1s\"\n{extra_master}"),
        &users,
    );
    for (name, _, max) in workers {
        config.push_str(&format!(
            "\n[[worker]]\nname = {name:?}\nmax_builds = {max}\n"
        ));
    }
    config.push_str(builds_toml);
    let mut secrets = secrets_text(&users);
    let worker_specs: Vec<UserSpec> = workers.iter().map(|(n, p, _)| (*n, *p, &[][..])).collect();
    secrets.push_str(secrets_text(&worker_specs).trim_start_matches("[verifiers]\n"));
    secrets.push_str(extra_secrets);
    std::fs::write(dir.path().join("master.toml"), config).unwrap();
    std::fs::write(dir.path().join("secrets.toml"), secrets).unwrap();
    TestMaster::start_in(dir).await
}

/// A builder `name` run by `w1`, with one step `step` running `shell`.
pub fn one_step_builder(name: &str, step: &str, shell: &str) -> String {
    format!(
        "\n[[builder]]\nname = {name:?}\nworkers = [\"w1\"]\n[[builder.step]]\nname = {step:?}\nshell = {shell:?}\n"
    )
}

pub async fn wait_connected(m: &TestMaster, n: usize) {
    within("workers to connect", async {
        while m.master.builds().connected().len() < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

pub async fn push(m: &TestMaster, branch: &str) -> i64 {
    push_change(
        m,
        switchyard::proto::Change {
            repository: "widgets".into(),
            branch: branch.into(),
            revision: "r1".into(),
            ..Default::default()
        },
    )
    .await
}

/// Pushes `change` as the `hook` user; returns its id.
pub async fn push_change(m: &TestMaster, change: switchyard::proto::Change) -> i64 {
    let mut conn = switchyard::grpc::client::ChangeSourceConnection::connect(
        &m.addr.to_string(),
        "hook",
        "hook-pw",
    )
    .await
    .unwrap();
    within("a push", conn.push(change)).await.unwrap()
}

/// Waits for `n` builds to end; returns their (id, result) in the order they ended.
pub async fn builds_ended(
    events: &mut tokio::sync::broadcast::Receiver<switchyard::builds::Stamped>,
    n: usize,
) -> Vec<(i64, String)> {
    let mut ended = Vec::new();
    within("builds to end", async {
        while ended.len() < n {
            if let Ok(e) = events.recv().await
                && let Event::BuildEnded { build, outcome, .. } = e.event
            {
                ended.push((build, outcome.to_string()));
            }
        }
    })
    .await;
    ended
}

pub async fn log_text(m: &TestMaster, build: i64, step: usize) -> String {
    let b = m.master.state().build(build).await.unwrap().unwrap();
    let row = b.steps[step].row;
    let chunks = m.master.state().log_page(row, 0, usize::MAX).await.unwrap();
    String::from_utf8(chunks.into_iter().flat_map(|c| c.data).collect()).unwrap()
}

/// Each link's forwarding task, and the flag that black-holes it.
type ProxyLinks =
    Arc<std::sync::Mutex<Vec<(tokio::task::AbortHandle, Arc<std::sync::atomic::AtomicBool>)>>>;

/// A TCP proxy on 127.0.0.1 between a client and a server, that can cut
/// every link it carries (both sockets reset) or
/// black-hole them (sockets left open, nothing forwarded any more, as when a
/// link silently drops packets).
pub struct Proxy {
    pub addr: SocketAddr,
    links: ProxyLinks,
    accept: tokio::task::JoinHandle<()>,
}

/// Copies from `r` to `w` until EOF, or until `frozen`: then holds both
/// sockets open and forwards nothing.
async fn forward(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if frozen.load(std::sync::atomic::Ordering::SeqCst) {
            // Swallow everything from now on, keeping both ends open.
            loop {
                if matches!(r.read(&mut buf).await, Ok(0) | Err(_)) {
                    std::future::pending::<()>().await;
                }
            }
        }
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: ProxyLinks = Default::default();
        let held = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let f = frozen.clone();
                let task = tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    // Closing with linger 0 sends RST: a cut is a reset, not a goodbye.
                    #[allow(deprecated)]
                    {
                        let _ = client.set_linger(Some(Duration::ZERO));
                        let _ = server.set_linger(Some(Duration::ZERO));
                    }
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(forward(cr, sw, f.clone()), forward(sr, cw, f));
                });
                held.lock().unwrap().push((task.abort_handle(), frozen));
            }
        });
        Proxy {
            addr,
            links,
            accept,
        }
    }

    /// Cuts every link open now; new ones are carried again.
    pub fn cut(&self) {
        for (task, _) in self.links.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Stops forwarding on every link open now, leaving the sockets open;
    /// new links are carried again.
    pub fn black_hole(&self) {
        for (_, frozen) in self.links.lock().unwrap().iter() {
            frozen.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// A worker process logging in through `addr` (a proxy, say).
pub fn spawn_worker_via(
    m: &TestMaster,
    addr: SocketAddr,
    name: &str,
    password: &str,
    basedir: &str,
) -> Reaped {
    spawn_worker_to(
        &[addr.to_string()],
        name,
        password,
        &m.dir.path().join(basedir),
        &[],
        &[],
    )
}

/// A master process of its own (so it can be killed with -9), on the files
/// in `dir`; returns it and the address it listens on.
pub fn master_process(dir: &std::path::Path) -> (Reaped, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(BIN)
        .args(["master", "--config"])
        .arg(dir.join("master.toml"))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut told = false;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if !told && let Some(addr) = address_in(&line) {
                let _ = tx.send(addr);
                told = true;
            }
        }
    });
    let addr = rx.recv_timeout(WAIT).expect("the master did not start");
    (Reaped(child), addr)
}

/// Runs `switchyard debug` once (off the async runtime, with the master's
/// temp dir as its home) and returns its stdout, or its stderr on failure.
pub async fn debug_cli(
    m: &TestMaster,
    user: &str,
    password: &str,
    args: &[&str],
) -> Result<String, String> {
    let (addr, user, password) = (m.addr.to_string(), user.to_string(), password.to_string());
    let home = m.dir.path().to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = within(
        "switchyard debug",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(BIN)
                .args(["debug", "--master", &addr, "--user", &user])
                .args(&args)
                .env("SWITCHYARD_PASSWORD", password)
                .env("HOME", home)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap()
        }),
    )
    .await
    .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// A port on 127.0.0.1 that was free a moment ago (for a master that must
/// come back on the same address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs git in `cwd` as Ada, with `examples/post-receive`'s settings: the
/// master at `master`, user `hook`, `repository` as the change's
/// repository, `home` as HOME. Returns stdout and stderr; fails the test if
/// git fails.
pub fn git_as_hook(
    master: &str,
    repository: &std::path::Path,
    home: &std::path::Path,
    cwd: &std::path::Path,
    args: &[&str],
) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=Ada", "-c", "user.email=ada@example.org"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(cwd)
        .env("SWITCHYARD_MASTER", master)
        .env("SWITCHYARD_USER", "hook")
        .env("SWITCHYARD_PASSWORD", "hook-pw")
        .env("SWITCHYARD_REPOSITORY", repository)
        .env("SWITCHYARD", BIN)
        .env("HOME", home)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// The address in a master's start line (`... listening on ADDR (pid ...`).
pub fn address_in(line: &str) -> Option<String> {
    let (_, rest) = line.split_once("listening on ")?;
    rest.split_whitespace().next().map(str::to_string)
}

/// A PostgreSQL server of the test's own, made with `initdb` in a temp dir
/// and run as the `postgres` user, so that a test can restart it without
/// disturbing the others (which use the machine's server). Stopped when
/// dropped.
pub struct PrivatePg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl PrivatePg {
    pub fn start() -> PrivatePg {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's programs under /usr/lib/postgresql")
            .map(|e| e.unwrap().path().join("bin"))
            .filter(|b| b.join("initdb").exists())
            .collect();
        versions.sort();
        let bin = versions.pop().expect("an initdb under /usr/lib/postgresql");
        let dir = tempfile::tempdir().unwrap();
        let pg = PrivatePg {
            dir,
            bin,
            port: free_port(),
        };
        pg.run(
            "chown",
            &["-R", "postgres:", &pg.dir.path().display().to_string()],
        );
        let data = pg.data();
        pg.as_postgres(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        pg.up();
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs one of PostgreSQL's programs as `postgres` (it refuses root).
    fn as_postgres(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program).display().to_string();
        let mut all = vec!["-u", "postgres", "--", path.as_str()];
        all.extend_from_slice(args);
        self.run("runuser", &all);
    }

    fn up(&self) {
        let (data, log) = (
            self.data(),
            self.dir.path().join("log").display().to_string(),
        );
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.dir.path().display()
        );
        self.as_postgres(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-w", "-o", &options, "start"],
        );
    }

    /// The database every server has.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server as a crash would (`immediate`: no checkpoint, every
    /// connection cut), keeps it down for `down`, and starts it again (it
    /// recovers from its WAL).
    pub fn crash_and_restart(&self, down: Duration) {
        let data = self.data();
        self.as_postgres("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        std::thread::sleep(down);
        self.up();
    }
}

impl Drop for PrivatePg {
    fn drop(&mut self) {
        let path = self.bin.join("pg_ctl").display().to_string();
        let _ = std::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                &path,
                "-D",
                &self.data(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}
