//! Running `wrk` in the client namespace and reading its report.

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use xdplb_tests::netns::Netns;

/// One wrk run.
pub struct Run<'a> {
    pub client: &'a Netns,
    pub url: String,
    pub duration: Duration,
    pub connections: u32,
    /// `-H "Connection: close"`: one request per connection.
    pub close: bool,
    /// Pin wrk to this CPU (`taskset -c`).
    pub cpu: Option<usize>,
}

/// What wrk reported.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub requests: u64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx answers.
    pub errors: u64,
}

impl Run<'_> {
    pub fn run(&self) -> Result<Report> {
        let mut cmd = match self.cpu {
            Some(cpu) => {
                let mut c = self.client.command("taskset");
                c.args(["-c", &cpu.to_string(), "wrk"]);
                c
            }
            None => self.client.command("wrk"),
        };
        cmd.args(["-t1", "--latency", "--timeout", "2s"])
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.duration.as_secs().max(1)));
        if self.close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(&self.url);
        let out = cmd.output().context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "wrk failed ({}): {text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse(&text).with_context(|| format!("reading wrk's report:\n{text}"))
    }
}

fn parse(text: &str) -> Result<Report> {
    let mut r = Report::default();
    for line in text.lines().map(str::trim) {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["Requests/sec:", v] => r.per_sec = v.parse()?,
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["50%", v] => r.p50_ms = millis(v)?,
            ["99%", v] => r.p99_ms = millis(v)?,
            ["Socket", "errors:", rest @ ..] => {
                r.errors += rest
                    .iter()
                    .filter_map(|s| s.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            _ => {}
        }
    }
    if r.requests == 0 || r.p99_ms == 0.0 {
        bail!("no requests or no latency distribution");
    }
    Ok(r)
}

/// "812.00us", "1.23ms", "2.01s" → milliseconds.
fn millis(v: &str) -> Result<f64> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .context("no unit")?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse()?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => bail!("unknown unit in {v:?}"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_a_report() {
        let text = "Running 3s test @ http://10.77.0.11/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.50us  200.10us   5.00ms   90.00%
    Req/Sec    38.00k     1.00k   40.00k    70.00%
  Latency Distribution
     50%  790.00us
     75%    0.90ms
     90%    1.00ms
     99%    1.20ms
  113456 requests in 3.00s, 30.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:  37818.67
Transfer/sec:     10.00MB
";
        let r = super::parse(text).unwrap();
        assert_eq!(r.requests, 113456);
        assert_eq!(r.errors, 3);
        assert!((r.p50_ms - 0.79).abs() < 1e-9 && (r.p99_ms - 1.2).abs() < 1e-9);
        assert!((r.per_sec - 37818.67).abs() < 1e-6);
    }
}
