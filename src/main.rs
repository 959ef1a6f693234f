//! The `mqtt-persist` command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use mqtt_persist::config::{Config, Db, Overrides};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mqtt-persist",
    version,
    about = "MQTT broker that persists broker events to databases (EMQX 4 backend compatible)"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Clone, Default)]
struct RunArgs {
    /// Configuration directory holding mqtt-persist.conf and plugins/
    #[arg(long, default_value = "etc", global = true)]
    etc: PathBuf,
    /// MQTT listen address, e.g. 127.0.0.1:1883 (port 0 picks a free port)
    #[arg(long)]
    listen: Option<String>,
    /// Directory for SQLite files and spools
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker (the default)
    Run(RunArgs),
    /// Validate the configuration; exits non-zero naming file:line on errors
    Check {
        /// Also connect to every configured pool and report its state
        #[arg(long)]
        connect: bool,
    },
    /// Make the running broker re-read etc/plugins (sends SIGHUP to the pid in data.dir)
    Reload,
    /// Print database schemas
    Schema {
        #[command(subcommand)]
        action: SchemaCmd,
    },
}

#[derive(Subcommand)]
enum SchemaCmd {
    /// Print the schema of one database: sqlite, pgsql, mysql, redis, mongo, cassa
    Print { db: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Schema {
            action: SchemaCmd::Print { db },
        }) => match Db::parse(&db).and_then(mqtt_persist::schema) {
            Some(s) => {
                print!("{s}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("no schema for `{db}` in this build (known: sqlite)");
                ExitCode::from(2)
            }
        },
        Some(Cmd::Check { connect }) => check(&cli.run.etc, connect),
        Some(Cmd::Reload) => reload_running(&cli.run),
        Some(Cmd::Run(args)) => run(args),
        None => run(cli.run),
    }
}

fn load(args: &RunArgs) -> Result<Config, ExitCode> {
    let ov = Overrides {
        listen: args.listen.clone(),
        data_dir: args.data_dir.clone(),
    };
    // Rules' own statements are compiled by their backends: part of loading, for `check` too.
    Config::load_checked(&args.etc, &ov, &|r| mqtt_persist::hooks::compile_rule(r).map(|_| ())).map_err(|errs| {
        eprintln!("{errs}");
        eprintln!("configuration has {} error(s)", errs.0.len());
        ExitCode::from(2)
    })
}

fn check(etc: &std::path::Path, connect: bool) -> ExitCode {
    let args = RunArgs {
        etc: etc.to_path_buf(),
        ..Default::default()
    };
    let conf = match load(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    for w in &conf.warnings {
        eprintln!("warning: {w}");
    }
    let mut bad = false;
    if let Err(e) = mqtt_persist::app::load_acl(&conf.broker) {
        eprintln!("{e}");
        bad = true;
    }
    for b in &conf.backends {
        for p in b.pools.values() {
            if let Err(e) = mqtt_persist::backends::validate(p) {
                eprintln!("{e}");
                bad = true;
            }
        }
    }
    if bad {
        return ExitCode::from(2);
    }
    let rules: usize = conf.backends.iter().map(|b| b.rules.len()).sum();
    println!("configuration ok: {} backend(s), {} rule(s)", conf.backends.len(), rules);
    if connect {
        let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
        let failed = rt.block_on(async {
            let mut failed = false;
            println!("{:<20} STATE", "POOL");
            for b in &conf.backends {
                for p in b.pools.values() {
                    let state = match mqtt_persist::backends::connect(p, &conf.broker.data_dir).await {
                        Ok(backend) => match mqtt_persist::backends::queue::timed(conf.broker.write_timeout, backend.ping()).await {
                            Ok(()) => "ok".to_string(),
                            Err(e) => format!("error: {e}"),
                        },
                        Err(e) => format!("error: {}", e.message),
                    };
                    failed |= state != "ok";
                    println!("{:<20} {}", p.label(), state);
                }
            }
            failed
        });
        if failed {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn run(args: RunArgs) -> ExitCode {
    let conf = match load(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},rumqttd=warn", conf.broker.log_level)));
    mqtt_persist::app::init_logging(filter, std::io::stdout);
    for w in &conf.warnings {
        tracing::warn!("{w}");
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(serve(conf, args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pid_file(conf: &Config) -> PathBuf {
    conf.broker.data_dir.join("mqtt-persist.pid")
}

fn reload_running(args: &RunArgs) -> ExitCode {
    let conf = match load(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = pid_file(&conf);
    let Ok(pid) = std::fs::read_to_string(&path) else {
        eprintln!("no running broker: {} not found", path.display());
        return ExitCode::FAILURE;
    };
    match std::process::Command::new("kill").args(["-HUP", pid.trim()]).status() {
        Ok(s) if s.success() => {
            println!("reload requested (pid {}); the broker logs the result", pid.trim());
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("cannot signal pid {}", pid.trim());
            ExitCode::FAILURE
        }
    }
}

async fn serve(conf: Config, args: RunArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let broker = mqtt_persist::app::start(&conf).await.map_err(anyhow::Error::msg)?;
    if let Some(addr) = &conf.broker.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr} (metrics.listen)"))?;
        tracing::info!("metrics on http://{}/metrics", l.local_addr()?);
        tokio::spawn(mqtt_persist::metrics::serve(l, broker.engine.metrics.clone()));
    }
    let pid = pid_file(&conf);
    let _ = std::fs::create_dir_all(&conf.broker.data_dir);
    let _ = std::fs::write(&pid, std::process::id().to_string());
    let plugins: Vec<&str> = conf.broker.plugins.iter().map(|d| d.name()).collect();
    tracing::info!(addr = %broker.addr, node = %conf.broker.node_name, plugins = %plugins.join(","), "mqtt-persist listening on {}", broker.addr);
    let overrides = Overrides {
        listen: args.listen.clone(),
        data_dir: args.data_dir.clone(),
    };
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hup.recv() => match mqtt_persist::app::reload(&broker.engine, &args.etc, &overrides).await {
                Ok(rules) => tracing::info!(rules, "configuration reloaded"),
                Err(errors) => {
                    for e in errors.lines() {
                        tracing::error!("{e}");
                    }
                    tracing::error!("reload rejected; the running configuration stays");
                }
            },
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("shutting down: no new connections, draining write queues");
    broker.stop_accepting();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let d = broker.engine.dispatcher();
    while std::time::Instant::now() < deadline
        && d.pools.iter().any(|p| {
            p.queue.room() < conf.broker.queue_capacity || p.queue.metrics.in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0
        })
    {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&pid);
    Ok(())
}
