//! The command line (README, Commands), as clap types only; behaviour is in
//! [`crate::commands`].

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// A metering reverse proxy for paid HTTP APIs.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    /// Config file [default: $TOLLGATE_CONFIG, else config/tollgate.toml; with
    /// neither present, built-in defaults]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve,
    /// Validate the config file: exit 0 if valid, 2 with file:line and field if not.
    CheckConfig,
    /// Apply pending database schema migrations and exit.
    Migrate,
    /// Manage customers.
    #[command(subcommand)]
    Customers(CustomersCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Usage totals from the daily rollups (default: this month, all customers).
    Usage {
        /// One customer's name or id.
        #[arg(long, value_name = "NAME_OR_ID")]
        customer: Option<String>,
        /// First day, UTC, inclusive (default: the 1st of this month).
        #[arg(long, value_name = "YYYY-MM-DD")]
        from: Option<String>,
        /// Last day, UTC, inclusive (default: the end of this month).
        #[arg(long, value_name = "YYYY-MM-DD")]
        to: Option<String>,
        /// One row per day, customer, route or model (default: one total).
        #[arg(long, value_enum)]
        by: Option<UsageBy>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Billing per calendar month.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Run an OpenAI- and Anthropic-compatible mock upstream (demos, tests, benches).
    MockUpstream {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Also receive webhooks signed with this secret (`whsec_...`), on
        /// `--webhook-listen` at `/webhooks`, printing each event as one
        /// JSON line with whether its signature checked out.
        #[arg(
            long,
            value_name = "SECRET",
            env = "TOLLGATE_WEBHOOK_SECRET",
            hide_env_values = true
        )]
        webhook_secret: Option<String>,
        /// Where the webhook receiver listens.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8001")]
        webhook_listen: SocketAddr,
    },
}

/// `usage --by`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UsageBy {
    Day,
    Customer,
    Route,
    Model,
}

#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// Each customer's requests, overage and metered cost for a month (the
    /// frozen lines once it is closed).
    Summary {
        #[arg(long, value_name = "YYYY-MM")]
        period: String,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Freeze a past month's billing lines; again returns the same lines.
    Close {
        #[arg(long, value_name = "YYYY-MM")]
        period: String,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CustomersCommand {
    /// Create a customer.
    Create {
        name: String,
        #[arg(long)]
        tier: String,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List customers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Change a customer's tier (live on every running gateway within 1 s).
    SetTier {
        /// The customer's name or id.
        name_or_id: String,
        tier: String,
        #[arg(long)]
        json: bool,
    },
}

/// A key's own limits on the command line.
#[derive(Debug, Default, clap::Args)]
pub struct KeyLimitArgs {
    /// Short-window rate for the key: N/s, N/min or N/h.
    #[arg(long, value_name = "RATE")]
    pub rate: Option<String>,
    /// Requests per calendar month for the key.
    #[arg(long, value_name = "N")]
    pub monthly_requests: Option<u64>,
    /// Tokens per calendar month for the key.
    #[arg(long, value_name = "N")]
    pub monthly_tokens: Option<u64>,
    /// Spend per calendar month for the key, in USD (e.g. 25.50).
    #[arg(long, value_name = "USD")]
    pub monthly_cost_usd: Option<String>,
}

impl KeyLimitArgs {
    /// `None` when no limit is given.
    pub fn view(&self) -> Option<tollgate_accounts::KeyLimitsView> {
        let view = tollgate_accounts::KeyLimitsView {
            rate: self.rate.clone(),
            monthly_requests: self.monthly_requests,
            monthly_tokens: self.monthly_tokens,
            monthly_cost_usd: self.monthly_cost_usd.clone(),
        };
        (view != tollgate_accounts::KeyLimitsView::default()).then_some(view)
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints the plaintext key exactly once.
    Create {
        /// The customer's name or id (created with --tier if new).
        #[arg(long)]
        customer: String,
        #[arg(long)]
        tier: Option<String>,
        /// A label for humans.
        #[arg(long)]
        name: Option<String>,
        /// Lifetime, e.g. 30d or 12h.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        /// Route names the key may use, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        routes: Option<Vec<String>>,
        #[command(flatten)]
        limits: KeyLimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Set a key's own limits, nested inside its customer's: the limits
    /// given replace the key's (and its rotation successors'); `--clear`
    /// removes them.
    SetLimits {
        /// The key's display prefix or id.
        prefix_or_id: String,
        #[command(flatten)]
        limits: KeyLimitArgs,
        /// Remove the key's own limits.
        #[arg(long, conflicts_with_all = ["rate", "monthly_requests", "monthly_tokens", "monthly_cost_usd"])]
        clear: bool,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never the plaintext).
    List {
        #[arg(long)]
        customer: Option<String>,
        #[arg(long, value_parser = ["active", "revoked", "expired"])]
        status: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key (refused everywhere within 1 s).
    Revoke {
        /// The key's display prefix or id.
        prefix_or_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Replace a key; the old one keeps working for the grace period.
    Rotate {
        prefix_or_id: String,
        /// How long the old key keeps working, e.g. 24h.
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        grace: String,
        #[arg(long)]
        json: bool,
    },
}
