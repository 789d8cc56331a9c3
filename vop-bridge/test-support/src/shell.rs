//! A shell on a card's console: types commands, reads their output and
//! their exit status.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::wait::wait_for;

/// A shell on a console: types commands and reads their output.
pub struct Shell {
    writer: Box<dyn Write + Send>,
    output: Arc<Mutex<Vec<u8>>>,
    marker: u32,
}

impl Shell {
    /// Starts collecting what `reader` yields; commands go to `writer`.
    pub fn new(mut reader: Box<dyn Read + Send>, writer: Box<dyn Write + Send>) -> Shell {
        let output = Arc::new(Mutex::new(Vec::new()));
        let out = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Shell {
            writer,
            output,
            marker: 0,
        }
    }

    /// Everything read so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Types `text`.
    pub fn type_text(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// Waits until the shell answers: what is typed before it reads is
    /// lost, so this types until it does (the typed line shows
    /// `$((40 + 2))`; only the shell prints 42), looking for the answer for
    /// up to 2 s after each try.
    pub fn wait_ready(&mut self) {
        wait_for(Duration::from_secs(90), "the console shell", || {
            self.type_text("echo READY-$((40 + 2))\n");
            let tried = Instant::now();
            while tried.elapsed() < Duration::from_secs(2) {
                if self.output().contains("READY-42") {
                    return Some(());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            None
        });
    }

    /// Runs a shell command; returns its output and exit code.
    pub fn run_status(&mut self, cmd: &str, timeout: Duration) -> (String, i32) {
        self.marker += 1;
        let n = self.marker;
        // The marker number is computed by the shell, so the echo of the
        // command line itself never matches.
        let begin = format!("<<B{}>>", 1000 + n);
        let end = format!("<<E{}>>", 1000 + n);
        let start = self.output.lock().unwrap().len();
        self.type_text(&format!(
            "echo '<<'B$((1000+{n}))'>>'; {cmd}; echo '<<'E$((1000+{n}))'>>' $?\n"
        ));
        let text = wait_for(timeout, &format!("`{cmd}` on the card"), || {
            let out = self.output.lock().unwrap();
            let s = String::from_utf8_lossy(&out[start..]).into_owned();
            let b = s.find(&begin)?;
            let e = s[b..].find(&end)? + b;
            let rest = &s[e + end.len()..];
            rest.contains('\n')
                .then(|| (s[b + begin.len()..e].to_string(), rest.to_string()))
        });
        let code = text
            .1
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(-1);
        (
            text.0.replace('\r', "").trim_matches('\n').to_string(),
            code,
        )
    }

    /// Runs a command that must succeed; returns its output.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> String {
        let (out, code) = self.run_status(cmd, timeout);
        assert_eq!(code, 0, "`{cmd}` failed on the card: {out}");
        out
    }
}
