"""A real Prometheus scrapes the running services; PromQL returns served reward and served KL;
promtool accepts the deploy config and rules; every metric the dashboard and alerts use exists."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.helpers import REPO, ServerProc, free_port, scrape, start_feedback_service

DEPLOY = REPO / "deploy"


def test_promtool_accepts_the_deploy_config_and_rules(tmp_path):
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    cfg = (DEPLOY / "prometheus" / "prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(cfg)
    for args in (["check", "config", str(tmp_path / "prometheus.yml")],
                 ["check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")]):
        r = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "SUCCESS" in r.stdout + r.stderr


def _used_metric_names() -> set[str]:
    exprs = [t["expr"] for p in json.loads((DEPLOY / "grafana" / "dashboards" / "rlhf.json").read_text())["panels"]
             for t in p["targets"]]
    exprs.append((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = set()
    for e in exprs:
        names |= set(re.findall(r"\brlhf_[a-z_]+", e))
    return names


def _prom_query(port: int, q: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def services(kafka_broker, tiny_store, tiny_hh_policy, tiny_bert, tmp_path_factory):
    """Policy server (served scoring of every response), RM server, feedback service, trainer."""
    from feedback.kafka_io import AckedProducer
    from feedback.topics import FEEDBACK
    tmp = tmp_path_factory.mktemp("obs")
    with contextlib.ExitStack() as started:   # a part that fails to start stops the ones before it
        def up(proc):
            started.callback(proc.stop)
            return proc
        rport, rmport = free_port(), free_port()
        up(ServerProc("serve.rm_server", ["--store", str(tiny_store), "--port", str(rport), "--metrics-port",
                                           str(rmport), "--threads", "1"], r"rm server listening", timeout=300))
        pport, pmport = free_port(), free_port()
        up(ServerProc("serve", ["--store", str(tiny_store), "--port", str(pport), "--metrics-port", str(pmport),
                                "--served-score-fraction", "1.0", "--rm-target", f"127.0.0.1:{rport}",
                                "--threads", "1"], r"policy server listening", timeout=300))
        fmport = free_port()
        fbs, _ = start_feedback_service(kafka_broker)
        fbs.stop()   # restart with a metrics port
        fport = free_port()
        up(ServerProc("feedback.service", ["--bootstrap", kafka_broker, "--port", str(fport), "--metrics-port",
                                           str(fmport)], r"feedback service listening"))
        p = AckedProducer(kafka_broker, client_id="obs-test")   # one bad record: the consumer dead-letters it
        p.wait(p.send_async(FEEDBACK, b"bad", b"\xff not a protobuf"))
        p.close()
        tmport = free_port()
        up(ServerProc("train.loop", ["--bootstrap", kafka_broker, "--group", f"obs-{time.time_ns()}", "--store",
                                     str(tmp / "store"), "--db", str(tmp / "t.db"), "--init-policy",
                                     str(tiny_hh_policy), "--rm-backbone", str(tiny_bert), "--metrics-port",
                                     str(tmport), "--cycle-comparisons", "100000"], r"trainer resumed", timeout=300))
        yield {"policy": (pport, pmport), "rm": (rport, rmport), "feedback": (fport, fmport), "trainer": tmport}


def _traffic(services) -> None:
    import grpc

    from rlhf.v1 import feedback_pb2 as fb
    from rlhf.v1 import feedback_pb2_grpc
    from serve.client import PolicyClient
    with PolicyClient(f"127.0.0.1:{services['policy'][0]}") as c:
        for i in range(6):
            c.generate(f"\n\nHuman: hello {i}\n\nAssistant:", max_new_tokens=8, n=2)
    with grpc.insecure_channel(f"127.0.0.1:{services['feedback'][0]}") as ch:
        feedback_pb2_grpc.FeedbackServiceStub(ch).SubmitRating(fb.Rating(
            source=fb.Source(kind=fb.SOURCE_KIND_USER, id="u"), prompt="p",
            response=fb.Response(text="t", model_version="v0000"), thumbs_up=True), timeout=30)


@pytest.mark.slow
def test_prometheus_scrapes_served_reward_and_kl_and_every_used_metric_exists(services, tmp_path):
    _traffic(services)
    ports = {"policy": services["policy"][1], "rm": services["rm"][1], "feedback": services["feedback"][1],
             "trainer": services["trainer"]}
    # wait for the off-path scoring and the trainer's dead letter
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = {k: scrape(p) for k, p in ports.items()}
        if "rlhf_policy_served_reward_count{" in text["policy"] and "rlhf_feedback_dead_letters_total{" in text["trainer"]:
            break
        time.sleep(0.5)
    exposed = set(re.findall(r"^(rlhf_[a-z_]+?)(?:_bucket|_sum|_count|_created)?[{ ]", "\n".join(text.values()), re.M))
    exposed |= set(re.findall(r"^(rlhf_[a-z_]+)[{ ]", "\n".join(text.values()), re.M))
    missing = {n for n in _used_metric_names() if n not in exposed and re.sub(r"_(bucket|sum|count)$", "", n) not in exposed}
    assert not missing, f"used by the dashboard/alerts but not exposed: {sorted(missing)}"

    # a real Prometheus server scrapes them; PromQL over its HTTP API returns the served series
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    jobs = "\n".join(f"  - job_name: {k}\n    static_configs: [{{targets: ['127.0.0.1:{p}']}}]" for k, p in ports.items())
    (tmp_path / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [alerts.yml]\nscrape_configs:\n{jobs}\n")
    web = free_port()
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{web}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, reward, kl = time.monotonic() + 90, [], []
        while time.monotonic() < deadline and not (reward and kl):
            time.sleep(1)
            try:
                reward = _prom_query(web, "rlhf_policy_served_reward_count")
                kl = _prom_query(web, 'sum by (version) (rlhf_policy_served_kl_nats_sum) '
                                      '/ sum by (version) (rlhf_policy_served_kl_nats_count)')
            except OSError:
                continue
        assert reward and kl, "Prometheus returned no served reward/KL series"
        assert reward[0]["metric"]["version"] == "v0000" and float(reward[0]["value"][1]) >= 6
        assert kl[0]["metric"]["version"] == "v0000" and abs(float(kl[0]["value"][1])) < 1e-3  # v0000 is the reference
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:   # every target scraped at least once, and up
            up = _prom_query(web, "up")
            if len(up) == 4 and all(r["value"][1] == "1" for r in up):
                break
            time.sleep(1)
        assert len(up) == 4 and all(r["value"][1] == "1" for r in up), up
        rules = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/rules", timeout=10).read())
        assert sum(len(g["rules"]) for g in rules["data"]["groups"]) == 6
    finally:
        prom.terminate()
        prom.wait(timeout=30)
