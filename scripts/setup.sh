#!/usr/bin/env bash
# Sets up everything on a fresh machine: Python deps (pinned in pyproject.toml), the generated
# gRPC code, the Kafka broker jars from Maven Central, and the default small policy.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "[setup] python packages (pyproject.toml pins; torch is large the first time)"
python3 -m pip install --quiet --disable-pip-version-check -e ".[dev]"

echo "[setup] generating gRPC code from protos/"
python3 -m protos.build

if ! ls deploy/kafka/lib/kafka_2.13-*.jar >/dev/null 2>&1; then
  echo "[setup] Kafka broker jars from Maven Central -> deploy/kafka/lib"
  mvn -q -B -f deploy/kafka/pom.xml dependency:copy-dependencies
fi
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "[setup] Prometheus and promtool from Debian (the observability tests run a real server)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "[setup] Chromium from Debian (tests/test_web.py drives the web pages in it headless; no browser download)"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
command -v java >/dev/null || { echo "[setup] java is required for the Kafka broker" >&2; exit 1; }

if [ ! -f models/policy-v0/config.json ]; then
  echo "[setup] building the default small policy -> models/policy-v0 (local, no download)"
  python3 -m serve.make_policy --out models/policy-v0
fi
echo "[setup] done"
