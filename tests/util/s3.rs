//! A real S3 server for the remote-store tests: moto (`pip install 'moto[server]'`), started on
//! 127.0.0.1 with a free port and stopped when dropped. The tests reach it with boto3 (part of moto's
//! install) to create the bucket, list it and damage an object, as a second client would.
//!
//! Without moto the S3 tests skip with a loud message, unless `PIPE_REQUIRE_S3=1` (CI), where they fail.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The secret every S3 test hands `pipe`: recognisable, so a test can grep for it.
pub const SECRET: &str = "pipe-test-SECRET-7f3a9c1e5b";
pub const KEY_ID: &str = "pipetestkeyid";

pub struct S3 {
    child: Child,
    pub endpoint: String,
    pub bucket: String,
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl S3 {
    /// A running server with an empty bucket, or None (after saying why on stderr) when moto is not
    /// installed and the environment does not require it.
    pub fn start(bucket: &str) -> Option<S3> {
        let required = std::env::var("PIPE_REQUIRE_S3").as_deref() == Ok("1");
        match Self::try_start(bucket) {
            Ok(s3) => Some(s3),
            Err(e) if required => panic!("PIPE_REQUIRE_S3=1 but the moto S3 server could not be started: {e}"),
            Err(e) => {
                eprintln!(
                    "\n!!!!! SKIPPING an S3 test: the moto S3 server could not be started ({e}).\n\
                     !!!!! Install it with `pip install 'moto[server]'`; CI sets PIPE_REQUIRE_S3=1 to make this fatal.\n"
                );
                None
            }
        }
    }

    fn try_start(bucket: &str) -> Result<S3, String> {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("python3: {e}"))?;
        let mut s3 = S3 { child, endpoint: format!("http://127.0.0.1:{port}"), bucket: bucket.to_string() };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = s3.child.try_wait() {
                return Err(format!("`python3 -m moto.server` exited with {status}"));
            }
            if start.elapsed() > Duration::from_secs(60) {
                return Err("moto did not listen within 60 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        s3.py(&format!("s3.create_bucket(Bucket={bucket:?})"));
        Ok(s3)
    }

    /// The environment `pipe` reads its S3 settings and credentials from.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// Run Python with `s3` a boto3 client of this server; its stdout.
    pub fn py(&self, code: &str) -> String {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url={:?}, aws_access_key_id='k', \
             aws_secret_access_key='s', region_name='us-east-1')\n{code}\n",
            self.endpoint
        );
        let out = Command::new("python3").args(["-c", &script]).output().expect("python3");
        assert!(out.status.success(), "python failed:\n{script}\n{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Every object key in the bucket under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let out = self.py(&format!(
            "p = s3.get_paginator('list_objects_v2')\n\
             for page in p.paginate(Bucket={:?}, Prefix={prefix:?}):\n    \
             for o in page.get('Contents', []): print(o['Key'])",
            self.bucket
        ));
        out.lines().map(str::to_string).collect()
    }

    pub fn get(&self, key: &str) -> Vec<u8> {
        let f = tempfile::NamedTempFile::new().unwrap();
        self.py(&format!("s3.download_file({:?}, {key:?}, {:?})", self.bucket, f.path().display().to_string()));
        std::fs::read(f.path()).unwrap()
    }

    pub fn put(&self, key: &str, bytes: &[u8]) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        self.py(&format!("s3.upload_file({:?}, {:?}, {key:?})", f.path().display().to_string(), self.bucket));
    }
}
