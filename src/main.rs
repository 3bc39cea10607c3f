//! `switchyard`: the command line. Everything it does lives in the library.
#![deny(unsafe_code)]

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};

use switchyard::auth::verifier::{MAX_ITERATIONS, MIN_ITERATIONS, Verifier};
use switchyard::client::{self, Credentials};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "A build master whose whole front door is one TCP port."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the master on the port its config names. SIGHUP reloads the
    /// config and the secrets; SIGINT or SIGTERM stops it.
    Master {
        /// The master's TOML config file (try examples/master.toml).
        #[arg(long, short, value_name = "FILE", default_value = "master.toml")]
        config: PathBuf,
        /// Write the master's process id to FILE once it listens (for
        /// `kill -HUP $(cat FILE)`); removed when it stops.
        #[arg(long, value_name = "FILE")]
        pidfile: Option<PathBuf>,
    },
    /// Turn a password into a verifier line for the secrets file. Reads the
    /// password from a prompt on a terminal, otherwise from the first line of
    /// standard input; prints the verifier alone on standard output.
    Passwd {
        /// The user the verifier is for (used in the prompt).
        user: String,
        /// PBKDF2 iterations: more is slower for attackers and for logins.
        #[arg(long, default_value_t = MIN_ITERATIONS, value_parser = clap::value_parser!(u32).range(MIN_ITERATIONS as i64..=MAX_ITERATIONS as i64))]
        iterations: u32,
    },
    /// Run a build worker: log in to the master as NAME, run the steps it
    /// sends under DIR, reconnect when the link drops. SIGINT or SIGTERM
    /// stop it (and its running steps).
    Worker {
        /// The master's address (the port defaults to 9989). Repeat it for
        /// masters that share one state database: the worker stays with
        /// the one it is logged in to and goes on to the next, in turn, when
        /// it cannot log in there.
        #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9989", value_parser = master_address)]
        master: Vec<String>,
        /// This worker's name: a [[worker]] in the master's config.
        #[arg(long)]
        name: String,
        /// Steps run in DIR/<builder>/<workdir>.
        #[arg(long, value_name = "DIR")]
        basedir: PathBuf,
        /// A file whose first line is the password; otherwise the
        /// SWITCHYARD_PASSWORD environment variable (removed from the
        /// worker's environment once read), otherwise a prompt.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// Pass this variable of the worker's environment to every step
        /// (repeatable). Steps otherwise get only PATH, HOME, USER, LOGNAME,
        /// LANG, LC_*, TMPDIR and TZ from the worker, plus what the master
        /// sends; never SWITCHYARD_PASSWORD.
        #[arg(long = "pass-env", value_name = "NAME")]
        pass_env: Vec<String>,
        /// (Benchmarks only) Runs steps without their supervisor, so they
        /// can outlive a killed worker: only to measure what it costs.
        #[arg(long, hide = true)]
        bench_unsupervised_steps: bool,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// TLS for the master's port.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// (Internal) Supervises one step for a worker: not for people.
    #[command(name = "__step", hide = true)]
    Step {
        #[arg(long)]
        parent: i32,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        argv: Vec<String>,
    },
    /// Push a change to a master (what a VCS hook runs). Prints the change's
    /// id once the master has stored it.
    Sendchange(Box<SendchangeArgs>),
    /// The operator's console on the master's port. With a COMMAND, runs it
    /// once and exits; without, an interactive console (`help` lists the
    /// commands).
    #[command(after_help = switchyard::debug::console::HELP)]
    Debug {
        #[command(flatten)]
        login: Login,
        /// Print machine-readable JSON.
        #[arg(long)]
        json: bool,
        /// The command and its arguments, e.g. `builds widgets --limit 5`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "COMMAND"
        )]
        command: Vec<String>,
    },
    /// Log in to a master's `ping` service and time a few echoes: checks
    /// that the port is up and that the credentials work.
    Ping {
        #[command(flatten)]
        login: Login,
        /// How many echoes.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        count: u32,
    },
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Write DIR/cert.pem and DIR/key.pem: a self-signed certificate for
    /// NAME, for trying TLS out (`[master.tls] cert = "DIR/cert.pem"`, `key
    /// = "DIR/key.pem"`), and print its SHA-256 pin (clients:
    /// `--tls --pin-sha256 PIN`). Use a certificate from your CA for real.
    SelfSigned {
        /// The host name (or IP address) clients connect to; repeatable.
        #[arg(long, required = true)]
        name: Vec<String>,
        /// Where to write cert.pem and key.pem (created if missing; existing
        /// files are not overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// A master's address as given on the command line: `HOST:PORT`, or a
/// bare host (or IP address) for the default port 9989.
fn master_address(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("give the master's address as HOST:PORT".into());
    }
    if s.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(s.to_string());
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 9989).to_string());
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            match port.parse::<u16>() {
                Ok(p) if p > 0 => Ok(s.to_string()),
                _ => Err(format!(
                    "{port:?} is not a port number (in {s:?}; write HOST:PORT)"
                )),
            }
        }
        Some(_) => Err(format!("{s:?} is not HOST:PORT")),
        None => Ok(format!("{s}:9989")),
    }
}

/// How a client reaches a master over TLS.
#[derive(clap::Args, Clone, Debug)]
struct TlsArgs {
    /// Connect with TLS, verifying the master's certificate (against the
    /// system's roots unless --ca-file or --pin-sha256 says otherwise).
    #[arg(long)]
    tls: bool,
    /// Trust the CA certificates in FILE (PEM) instead of the system's.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls",
        conflicts_with = "pin_sha256"
    )]
    ca_file: Option<PathBuf>,
    /// The name the master's certificate must carry, if not the host in
    /// --master.
    #[arg(long, value_name = "NAME", requires = "tls")]
    server_name: Option<String>,
    /// Trust exactly the certificate with this SHA-256 (64 hex digits, as
    /// `switchyard tls self-signed` prints it): for a self-signed master.
    #[arg(long, value_name = "HEX", requires = "tls")]
    pin_sha256: Option<String>,
    /// How to log in: `scram` (the password never crosses the wire) or
    /// `plain` (the password itself, inside TLS only: for users the
    /// master's [[checker]] judges, not a verifier in its secrets file).
    /// `sendchange` always sends HTTP Basic credentials.
    #[arg(long, value_enum, default_value = "scram")]
    mechanism: MechanismArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum MechanismArg {
    Scram,
    Plain,
}

impl TlsArgs {
    /// The client options these ask for.
    fn client_options(&self) -> Result<switchyard::client::ClientOptions, String> {
        use switchyard::wire::tls::{ClientTls, Trust};
        let mut opts = switchyard::client::ClientOptions::default();
        if self.tls {
            let trust = match (&self.ca_file, &self.pin_sha256) {
                (Some(f), _) => Trust::CaFile(f.clone()),
                (None, Some(p)) => Trust::Pin(p.clone()),
                (None, None) => Trust::System,
            };
            opts.tls =
                Some(ClientTls::new(&trust, self.server_name.clone()).map_err(|e| e.to_string())?);
        }
        opts.mechanism = match self.mechanism {
            MechanismArg::Scram => switchyard::client::Mechanism::Scram,
            MechanismArg::Plain if !self.tls => {
                return Err("--mechanism plain sends the password itself: it needs --tls".into());
            }
            MechanismArg::Plain => switchyard::client::Mechanism::Plain,
        };
        Ok(opts)
    }
}

/// Where and as whom a client logs in.
#[derive(clap::Args)]
struct Login {
    /// The master's address (the port defaults to 9989).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9989", value_parser = master_address)]
    master: String,
    /// The user to log in as (it must be granted the command's service).
    #[arg(long, short)]
    user: String,
    /// A file whose first line is the password; otherwise the
    /// SWITCHYARD_PASSWORD environment variable, otherwise a prompt.
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

impl Login {
    fn password(&self) -> Result<String, String> {
        read_password(self.password_file.as_ref(), &self.user)
    }
}

#[derive(clap::Args)]
struct SendchangeArgs {
    #[command(flatten)]
    login: Login,
    /// Where the change happened (a URL or a name the schedulers know).
    #[arg(long, required_unless_present = "flush")]
    repository: Option<String>,
    /// Keep the change in DIR until the master acknowledges it: if the
    /// master cannot be reached, the change waits there (exit status 75)
    /// and is sent, in order, by the next `sendchange --spool DIR` or by
    /// `--flush DIR`.
    #[arg(long, value_name = "DIR", conflicts_with = "flush")]
    spool: Option<PathBuf>,
    /// Send the changes waiting in the spool DIR, in order, and nothing
    /// else (exit status 75 if some are still waiting).
    #[arg(long, value_name = "DIR")]
    flush: Option<PathBuf>,
    /// The branch the change is on.
    #[arg(long, default_value = "", hide_default_value = true)]
    branch: String,
    /// The revision (commit id).
    #[arg(long, default_value = "", hide_default_value = true)]
    revision: String,
    /// Who made the change.
    #[arg(long, default_value = "", hide_default_value = true)]
    author: String,
    /// The commit message.
    #[arg(long, default_value = "", hide_default_value = true)]
    comments: String,
    /// A category schedulers can filter on.
    #[arg(long, default_value = "", hide_default_value = true)]
    category: String,
    /// The project the change belongs to.
    #[arg(long, default_value = "", hide_default_value = true)]
    project: String,
    /// A path the change touches (repeat for more).
    #[arg(long = "file", value_name = "PATH")]
    files: Vec<String>,
    /// A property of the change (repeat for more).
    #[arg(long = "property", value_name = "NAME=VALUE", value_parser = parse_property)]
    properties: Vec<(String, String)>,
    /// The commit time in seconds since the Unix epoch (default: when the
    /// master receives it).
    #[arg(long, value_name = "UNIX_SECONDS")]
    when: Option<i64>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

/// The exit status of a `sendchange` whose change (or a spooled one) is
/// kept for later: EX_TEMPFAIL.
const EXIT_KEPT: u8 = 75;

/// Whether `sendchange` delivered what it was asked to.
enum Delivered {
    Yes,
    /// Kept in the spool for later.
    Kept,
}

async fn sendchange(a: Box<SendchangeArgs>, password: String) -> Result<Delivered, String> {
    use switchyard::grpc::client::ChangeSourceConnection;
    use switchyard::grpc::spool::ChangeSpool;
    let opts = a.login.tls.client_options()?;
    let connect = || async {
        let mut conn = ChangeSourceConnection::connect_with(
            &a.login.master,
            &a.login.user,
            &password,
            opts.tls.as_ref(),
        )
        .await?;
        if let Some(t) = DeviceTokenFile::new(&a.login.master, &a.login.user).load() {
            conn.set_device_token(&t);
        }
        Ok::<_, switchyard::grpc::client::SendChangeError>(conn)
    };
    let save_token = |conn: &ChangeSourceConnection| {
        DeviceTokenFile::new(&a.login.master, &a.login.user).save(conn.device_token());
    };
    let Some(dir) = a.spool.as_ref().or(a.flush.as_ref()) else {
        let mut conn = connect().await.map_err(|e| e.to_string())?;
        let id = conn.push(change_of(&a)).await.map_err(|e| e.to_string())?;
        save_token(&conn);
        println!("{id}");
        return Ok(Delivered::Yes);
    };
    let spool = ChangeSpool::open(dir).map_err(|e| e.to_string())?;
    let lock = spool
        .lock(std::time::Duration::from_secs(30))
        .await
        .map_err(|e| e.to_string())?;
    let mine = match a.flush {
        Some(_) => None,
        None => Some(lock.add(&change_of(&a)).map_err(|e| e.to_string())?),
    };
    let waiting = lock.pending().map_err(|e| e.to_string())?.len();
    let mut conn = match connect().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchyard: {e}");
            eprintln!(
                "switchyard: {waiting} change(s) kept in {}; the next `sendchange --spool` or `sendchange --flush` sends them",
                dir.display()
            );
            return Ok(Delivered::Kept);
        }
    };
    let flushed = lock.flush(&mut conn).await.map_err(|e| e.to_string())?;
    save_token(&conn);
    let mut delivered = mine.is_none();
    for (path, id) in &flushed.sent {
        if Some(path) == mine.as_ref() {
            delivered = true;
            println!("{id}");
        } else if mine.is_some() {
            eprintln!(
                "switchyard: sent the spooled {} as change {id}",
                path.display()
            );
        } else {
            println!("{id}");
        }
    }
    for (path, why) in &flushed.rejected {
        eprintln!(
            "switchyard: the master refused {} (moved there): {why}",
            path.display()
        );
        if Some(path.file_name()) == mine.as_ref().map(|m| m.file_name()) {
            return Err(format!("the master refused the change: {why}"));
        }
    }
    if let Some(e) = &flushed.stopped {
        use switchyard::grpc::client::SendChangeError as E;
        if matches!(e, E::Credentials { .. } | E::NotAllowed { .. }) {
            // Retrying will not help until the operator fixes this.
            return Err(format!(
                "{e}; {} change(s) kept in {}",
                flushed.left,
                dir.display()
            ));
        }
        eprintln!("switchyard: {e}");
        eprintln!(
            "switchyard: {} change(s) kept in {}; the next `sendchange --spool` or `sendchange --flush` sends them",
            flushed.left,
            dir.display()
        );
        return Ok(Delivered::Kept);
    }
    Ok(if delivered {
        Delivered::Yes
    } else {
        Delivered::Kept
    })
}

/// The change the arguments describe.
fn change_of(a: &SendchangeArgs) -> switchyard::proto::Change {
    switchyard::proto::Change {
        repository: a.repository.clone().unwrap_or_default(),
        branch: a.branch.clone(),
        revision: a.revision.clone(),
        author: a.author.clone(),
        comments: a.comments.clone(),
        category: a.category.clone(),
        project: a.project.clone(),
        files: a.files.clone(),
        when: a
            .when
            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
        properties: a.properties.iter().cloned().collect(),
    }
}

async fn worker(
    masters: Vec<String>,
    name: String,
    basedir: PathBuf,
    password: String,
    pass_env: Vec<String>,
    unsupervised: bool,
    client: switchyard::client::ClientOptions,
) -> Result<(), String> {
    use switchyard::worker::step;
    use tokio::signal::unix::{SignalKind, signal};
    step::check_pass_env(&pass_env).map_err(|e| format!("--pass-env: {e}"))?;
    // Steps run as this user: keep them from reading this process's memory
    // and its initial environment (/proc/PID/environ) or tracing it.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot make the worker undumpable; steps of the same user could read its memory");
    }
    std::fs::create_dir_all(&basedir)
        .map_err(|e| format!("cannot create the basedir {}: {e}", basedir.display()))?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let stopper = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping the worker and its steps");
        stopper.cancel();
    });
    let mut opts = switchyard::worker::agent::AgentOptions::new(masters, name, password, basedir);
    // Steps run under a supervisor, so they die with the worker: the small
    // `switchyard-step` beside this binary (faster to start), else this
    // binary's own `__step`.
    opts.step_supervisor = std::env::current_exe()
        .ok()
        .filter(|_| !unsupervised)
        .map(|me| {
            let small = me.with_file_name("switchyard-step");
            if small.is_file() { small } else { me }
        });
    if unsupervised {
        tracing::warn!(
            "steps run without their supervisor (--bench-unsupervised-steps): they can outlive this worker"
        );
    }
    let vars = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    opts.step_env = step::base_env(vars, &pass_env);
    opts.tls = client.tls;
    opts.mechanism = client.mechanism;
    switchyard::worker::agent::run(opts, shutdown).await;
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A log nobody reads any more (stderr piped to a reader that went
        // away) is dropped: the master or worker keeps serving. Reporting
        // the failed write would itself write to stderr, and panic.
        .log_internal_errors(false)
        .init();
}

fn first_line(reader: impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    let mut reader = reader;
    reader
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the password: {e}"))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_new_password(user: &str) -> Result<String, String> {
    let password = if std::io::stdin().is_terminal() {
        let p = rpassword::prompt_password(format!("New password for {user}: "))
            .map_err(|e| format!("cannot read the password: {e}"))?;
        let again = rpassword::prompt_password("Again: ")
            .map_err(|e| format!("cannot read the password: {e}"))?;
        if p != again {
            return Err("the passwords do not match".into());
        }
        p
    } else {
        first_line(std::io::stdin().lock())?
    };
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    Ok(password)
}

/// `--password-file`, then `SWITCHYARD_PASSWORD`, then a prompt.
fn read_password(file: Option<&PathBuf>, user: &str) -> Result<String, String> {
    if let Some(f) = file {
        let fh = std::fs::File::open(f)
            .map_err(|e| format!("cannot open password file {}: {e}", f.display()))?;
        return first_line(std::io::BufReader::new(fh));
    }
    if let Ok(p) = std::env::var("SWITCHYARD_PASSWORD") {
        forget_password_variable();
        return Ok(p);
    }
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password(format!("Password for {user}: "))
            .map_err(|e| format!("cannot read the password: {e}"));
    }
    Err("no password: give --password-file FILE or set SWITCHYARD_PASSWORD".into())
}

/// Where a one-shot command keeps the device token the master issued it
/// for (master, user), so that its next run is not throttled by strangers'
/// failed logins: `~/.switchyard/tokens/<digest>`, readable by its owner
/// only. A token is not a password: it only exempts its holder from others'
/// failures. Nothing is kept when there is no home directory.
struct DeviceTokenFile(Option<PathBuf>);

impl DeviceTokenFile {
    fn new(master: &str, user: &str) -> Self {
        use sha2::Digest;
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
        DeviceTokenFile(home.map(|h| {
            let digest = sha2::Sha256::digest(format!("{master}\0{user}").as_bytes());
            let name = switchyard::wire::hex(&digest[..16]);
            PathBuf::from(h)
                .join(".switchyard")
                .join("tokens")
                .join(name)
        }))
    }

    fn load(&self) -> Option<String> {
        client::load_device_token(self.0.as_ref()?)
    }

    fn save(&self, token: Option<String>) {
        if let (Some(path), Some(token)) = (&self.0, token) {
            client::save_device_token(path, &token);
        }
    }
}

/// Removes `SWITCHYARD_PASSWORD` from this process's environment once it
/// has been read, so nothing this process starts can inherit it.
#[allow(unsafe_code)]
fn forget_password_variable() {
    // SAFETY: called only from `read_password`, which every command runs
    // before it starts the async runtime: the process has one thread, so no
    // other thread can be reading the environment.
    unsafe { std::env::remove_var("SWITCHYARD_PASSWORD") };
}

async fn ping(
    master: &str,
    user: &str,
    password: String,
    count: u32,
    opts: &switchyard::client::ClientOptions,
) -> Result<(), String> {
    let creds = Credentials::new(user, password);
    let saved = DeviceTokenFile::new(master, user);
    creds.set_device_token(saved.load());
    let started = Instant::now();
    let mut session = client::connect_with(master, switchyard::services::ping::NAME, &creds, opts)
        .await
        .map_err(|e| e.to_string())?;
    saved.save(creds.device_token());
    let login = started.elapsed();
    let started = Instant::now();
    for i in 0..count {
        let payload = bytes::Bytes::from(format!("ping {i}"));
        session
            .stream
            .send(payload.clone())
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        let echo = tokio::time::timeout(Duration::from_secs(10), session.stream.next())
            .await
            .map_err(|_| "no echo within 10 s".to_string())?
            .ok_or("the master closed the session")?
            .map_err(|e| format!("receive failed: {e}"))?;
        if echo.freeze() != payload {
            return Err("the echo differs from what was sent".into());
        }
    }
    let per = started.elapsed() / count;
    println!(
        "ok: {} session {} logged in in {login:.1?}; {count} echoes, {per:.1?} each",
        session.server_agent, session.session_id
    );
    Ok(())
}

fn main() -> ExitCode {
    // A step's supervisor starts once per step: `__step --parent PID --
    // ARGV...` is read without building the whole command line parser, and
    // runs with no logging and no async runtime.
    let args: Vec<String> = std::env::args().skip(1).take(4).collect();
    if let [step, flag, parent, how, ..] = &args[..]
        && step == "__step"
        && flag == "--parent"
        && let Ok(parent) = parent.parse()
    {
        use switchyard::worker::step;
        match how.as_str() {
            "--stdin" if args.len() == 4 && std::env::args().len() == 5 => {
                std::process::exit(step::supervise_from_stdin(parent))
            }
            "--host" if args.len() == 4 && std::env::args().len() == 5 => {
                std::process::exit(switchyard::worker::host::serve(parent))
            }
            "--" => {
                let argv: Vec<String> = std::env::args().skip(5).collect();
                std::process::exit(step::supervise(&argv, parent));
            }
            _ => {}
        }
    }
    // An upload step's command on the worker: `__upload SOURCE`.
    if let [upload, source] = &args[..]
        && upload == "__upload"
    {
        std::process::exit(switchyard::worker::upload::run(source));
    }
    let cli = Cli::parse();
    if let Command::Step { parent, argv } = &cli.command {
        std::process::exit(switchyard::worker::step::supervise(argv, *parent));
    }
    init_logging();
    let result = match cli.command {
        Command::Step { .. } => Ok(()),
        Command::Passwd { user, iterations } => read_new_password(&user).and_then(|pw| {
            let v =
                Verifier::from_password(pw.as_bytes(), iterations).map_err(|e| e.to_string())?;
            println!("{}", v.encode());
            Ok(())
        }),
        Command::Master { config, pidfile } => {
            if !config.exists() {
                Err(format!(
                    "{}: no such file; give the master's config with --config FILE (try `switchyard master --config examples/master.toml`)",
                    config.display()
                ))
            } else {
                runtime().and_then(|rt| {
                    rt.block_on(switchyard::master::run(&config, pidfile.as_deref()))
                        .map_err(|e| e.to_string())
                })
            }
        }
        Command::Worker {
            master,
            name,
            basedir,
            password_file,
            pass_env,
            bench_unsupervised_steps,
            tls,
        } => tls.client_options().and_then(|opts| {
            read_password(password_file.as_ref(), &name).and_then(|pw| {
                worker_runtime().and_then(|rt| {
                    rt.block_on(worker(
                        master,
                        name,
                        basedir,
                        pw,
                        pass_env,
                        bench_unsupervised_steps,
                        opts,
                    ))
                })
            })
        }),
        Command::Tls(TlsCommand::SelfSigned { name, out }) => {
            switchyard::dispatcher::tls::write_self_signed(&name, &out).map(|pin| {
                println!(
                    "wrote {} and {}",
                    out.join("cert.pem").display(),
                    out.join("key.pem").display()
                );
                println!("sha256 pin: {pin}");
            })
        }
        Command::Debug {
            login,
            json,
            command,
        } => login.tls.client_options().and_then(|opts| {
            let pw = login.password()?;
            // `--json` counts wherever it is on the line.
            let json = json || command.iter().any(|w| w == "--json");
            let command: Vec<String> = command.into_iter().filter(|w| w != "--json").collect();
            let creds = Credentials::new(&login.user, pw);
            let saved = DeviceTokenFile::new(&login.master, &login.user);
            creds.set_device_token(saved.load());
            let result = runtime().and_then(|rt| {
                if command.is_empty() {
                    switchyard::debug::console::interactive(&rt, &login.master, &creds, &opts, json)
                } else {
                    rt.block_on(switchyard::debug::console::once(
                        &login.master,
                        &creds,
                        &opts,
                        json,
                        &command,
                    ))
                }
            });
            saved.save(creds.device_token());
            result
        }),
        Command::Sendchange(args) => match args
            .login
            .password()
            .and_then(|pw| runtime().and_then(|rt| rt.block_on(sendchange(args, pw))))
        {
            Ok(Delivered::Yes) => Ok(()),
            Ok(Delivered::Kept) => return ExitCode::from(EXIT_KEPT),
            Err(e) => Err(e),
        },
        Command::Ping { login, count } => login.tls.client_options().and_then(|opts| {
            let pw = login.password()?;
            runtime().and_then(|rt| rt.block_on(ping(&login.master, &login.user, pw, count, &opts)))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The worker's runtime: one thread. Its work is moving step output from
/// pipes to the master's socket; on one thread a chunk goes from the pipe
/// to the socket without waking another thread (blocking work, like
/// checking a download, still has threads of its own).
fn worker_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}
