"""Token roles against every RPC of the policy, feedback and RM servers, with TLS on and off."""
from __future__ import annotations

import contextlib
import subprocess
import time

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.auth import bearer, channel
from rlhf.v1 import feedback_pb2 as fb
from rlhf.v1 import feedback_pb2_grpc as fb_grpc
from rlhf.v1 import models_pb2 as mpb
from rlhf.v1 import models_pb2_grpc as mgrpc
from rlhf.v1 import policy_pb2 as pb
from rlhf.v1 import policy_pb2_grpc as pb_grpc
from tests.helpers import ServerProc, free_port

TOKENS = {"client": "tok-client-Zq9", "labeler": "tok-labeler-Xw1", "admin": "tok-admin-Pp4"}
SECRET_PROMPT = "my-very-private-prompt-4471"
OK, UNAUTH, DENIED, BAD = "OK", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"


def _self_signed(tmp) -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost and 127.0.0.1 in tmp (cert.pem, key.pem): (key, cert) bytes."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp / "key.pem"),
                    "-out", str(tmp / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
    return (tmp / "key.pem").read_bytes(), (tmp / "cert.pem").read_bytes()


@pytest.fixture(scope="module", params=["plaintext", "tls"])
def servers(request, tmp_path_factory, tiny_store, kafka_broker):
    tmp = tmp_path_factory.mktemp("auth")
    (tmp / "tokens.txt").write_text("# token role\n" + "".join(f"{t} {r}\n" for r, t in TOKENS.items()))
    flags = ["--auth-tokens", str(tmp / "tokens.txt")]
    ca = ""
    if request.param == "tls":
        _self_signed(tmp)
        flags += ["--tls-cert", str(tmp / "cert.pem"), "--tls-key", str(tmp / "key.pem")]
        ca = str(tmp / "cert.pem")
    ports = {k: free_port() for k in ("policy", "rm", "feedback")}
    starts = [
        lambda: ServerProc("serve", ["--store", str(tiny_store), "--port", str(ports["policy"]), "--metrics-port", "0",
                                     *flags], r"policy server listening", timeout=300),
        lambda: ServerProc("serve.rm_server", ["--store", str(tiny_store), "--port", str(ports["rm"]),
                                               "--metrics-port", "0", *flags], r"rm server listening", timeout=300),
        lambda: ServerProc("feedback.service", ["--bootstrap", kafka_broker, "--port", str(ports["feedback"]),
                                                "--metrics-port", "0", *flags], r"feedback service listening"),
    ]
    with contextlib.ExitStack() as started:   # a server that fails to start stops the ones before it
        procs = []
        for start in starts:
            procs.append(start())
            started.callback(procs[-1].stop)
        yield ports, ca, procs


def _code(fn) -> str:
    try:
        fn()
        return OK
    except grpc.RpcError as e:
        return e.code().name


def _user(kind=fb.SOURCE_KIND_USER):
    return fb.Source(kind=kind, id="someone")


def _calls(ports, ca):
    """(name, callable(metadata)) for every RPC under test."""
    pol = channel(f"127.0.0.1:{ports['policy']}", ca)
    rm = channel(f"127.0.0.1:{ports['rm']}", ca)
    fbc = channel(f"127.0.0.1:{ports['feedback']}", ca)
    P, A, R = pb_grpc.PolicyServiceStub(pol), mgrpc.AdminServiceStub(pol), mgrpc.RewardServiceStub(rm)
    RA, F = mgrpc.AdminServiceStub(rm), fb_grpc.FeedbackServiceStub(fbc)
    resp = fb.Response(text="an answer", model_version="v0000")
    resp2 = fb.Response(text="another answer", model_version="v0000")
    gen = pb.GenerateRequest(text=SECRET_PROMPT, params=pb.SamplingParams(max_new_tokens=2))
    return {
        "Generate": lambda md: P.Generate(gen, metadata=md, timeout=60),
        "GenerateStream": lambda md: list(P.GenerateStream(gen, metadata=md, timeout=60)),
        "GetModelInfo": lambda md: P.GetModelInfo(pb.GetModelInfoRequest(), metadata=md, timeout=30),
        "Policy.ListVersions": lambda md: A.ListVersions(mpb.ListVersionsRequest(), metadata=md, timeout=30),
        "Policy.PinVersion": lambda md: A.PinVersion(mpb.PinVersionRequest(version="v0000"), metadata=md, timeout=60),
        "RM.Score": lambda md: R.Score(mpb.ScoreRequest(items=[mpb.ScoreItem(prompt=SECRET_PROMPT, response="r")]),
                                       metadata=md, timeout=30),
        "RM.Rollback": lambda md: RA.Rollback(mpb.RollbackRequest(), metadata=md, timeout=30),
        "SubmitRating(user)": lambda md: F.SubmitRating(fb.Rating(source=_user(), prompt=SECRET_PROMPT, response=resp,
                                                                  thumbs_up=True), metadata=md, timeout=30),
        "SubmitRating(labeler)": lambda md: F.SubmitRating(fb.Rating(
            source=_user(fb.SOURCE_KIND_LABELER), prompt="p", response=resp, likert=6), metadata=md, timeout=30),
        "SubmitRating(kind=99)": lambda md: F.SubmitRating(fb.Rating(source=_user(99), prompt="p", response=resp,
                                                                     thumbs_up=True), metadata=md, timeout=30),
        "SubmitComparison(user)": lambda md: F.SubmitComparison(fb.Comparison(
            source=_user(), prompt="p", a=resp, b=resp2, preferred=fb.Comparison.CHOICE_A), metadata=md, timeout=30),
        "SubmitComparison(labeler)": lambda md: F.SubmitComparison(fb.Comparison(
            source=_user(fb.SOURCE_KIND_LABELER), prompt="p", a=resp, b=resp2, preferred=fb.Comparison.CHOICE_B),
            metadata=md, timeout=30),
        "SubmitRanking(labeler)": lambda md: F.SubmitRanking(fb.Ranking(
            source=_user(fb.SOURCE_KIND_LABELER), prompt="p", responses=[resp, resp2]), metadata=md, timeout=30),
        "Reflection": lambda md: next(reflection_pb2_grpc.ServerReflectionStub(fbc).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=md, timeout=30)),
    }, (pol, rm, fbc)


# expected status per RPC for: no token, a wrong token, client, labeler, admin
EXPECTED = {
    "Generate": (UNAUTH, UNAUTH, OK, OK, OK),          # labelers generate the K answers they rank
    "GenerateStream": (UNAUTH, UNAUTH, OK, OK, OK),
    "GetModelInfo": (UNAUTH, UNAUTH, OK, OK, OK),
    "Policy.ListVersions": (UNAUTH, UNAUTH, DENIED, DENIED, OK),
    "Policy.PinVersion": (UNAUTH, UNAUTH, DENIED, DENIED, OK),
    "RM.Score": (UNAUTH, UNAUTH, OK, DENIED, OK),
    "RM.Rollback": (UNAUTH, UNAUTH, DENIED, DENIED, "FAILED_PRECONDITION"),  # admin: allowed, nothing to roll back to
    "SubmitRating(user)": (UNAUTH, UNAUTH, OK, DENIED, OK),
    "SubmitRating(labeler)": (UNAUTH, UNAUTH, DENIED, OK, OK),     # a labeler's Likert score (InstructGPT)
    "SubmitRating(kind=99)": (UNAUTH, UNAUTH, BAD, BAD, BAD),      # bad input, whoever sends it (was INTERNAL)
    "SubmitComparison(user)": (UNAUTH, UNAUTH, OK, DENIED, OK),
    "SubmitComparison(labeler)": (UNAUTH, UNAUTH, DENIED, OK, OK),
    "SubmitRanking(labeler)": (UNAUTH, UNAUTH, DENIED, OK, OK),
    "Reflection": (UNAUTH, UNAUTH, OK, OK, OK),   # any token: no data, but a stream anyone could hold open
}


@pytest.mark.slow
def test_each_role_against_each_rpc(servers):
    ports, ca, procs = servers
    calls, chans = _calls(ports, ca)
    who = [(), bearer("not-a-token"), bearer(TOKENS["client"]), bearer(TOKENS["labeler"]), bearer(TOKENS["admin"])]
    got = {name: tuple(_code(lambda: fn(md)) for md in who) for name, fn in calls.items()}
    for c in chans:
        c.close()
    assert got == EXPECTED
    # health stays open for probes; tokens and prompt text never reach the logs
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with channel(f"127.0.0.1:{ports['policy']}", ca) as ch:
        st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert st == health_pb2.HealthCheckResponse.SERVING
    logs = "".join(p.output() for p in procs)
    assert SECRET_PROMPT not in logs and not any(t in logs for t in TOKENS.values())
    if ca:  # a TLS server refuses a plaintext client, whatever its token
        with grpc.insecure_channel(f"127.0.0.1:{ports['policy']}") as ch:
            with pytest.raises(grpc.RpcError) as e:
                pb_grpc.PolicyServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(),
                                                           metadata=bearer(TOKENS["admin"]), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


class _RecordingRM(mgrpc.RewardServiceServicer):
    """An RM server's Score that records each scored response and answers 0.25."""

    def __init__(self):
        self.seen: list[str] = []

    def Score(self, request, context):
        self.seen.append(request.items[0].response)
        return mpb.ScoreResponse(scores=[0.25])


def _scoring_errors(port: int, rm: _RecordingRM, text: str, **scorer_kwargs) -> float:
    """Served scoring of one sample against 127.0.0.1:port: how many scoring errors it counted (0 when
    the RM answered) once the RM has seen `text` or an error was counted."""
    from serve import metrics
    from serve.served_scoring import Sample, ServedScorer
    errors = metrics.SERVED_SCORING_ERRORS._value.get()
    scorer = ServedScorer(1.0, None, f"127.0.0.1:{port}", **scorer_kwargs)
    scorer.offer(Sample("v0000", None, [1], [2], "\n\nHuman: hi\n\nAssistant:", text))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and text not in rm.seen and metrics.SERVED_SCORING_ERRORS._value.get() == errors:
        time.sleep(0.05)
    return metrics.SERVED_SCORING_ERRORS._value.get() - errors


def test_served_scoring_presents_its_token_to_an_rm_server_that_checks_tokens(tmp_path):
    """The policy server's served scoring calls RewardService.Score with --rm-token-file's token: a real
    gRPC server with the servers' own interceptors answers it; without the token the call is refused
    and counted as a scoring error, never raised into serving."""
    from concurrent import futures

    from common.auth import interceptors
    (tmp_path / "tokens.txt").write_text(f"{TOKENS['client']} client\n")
    rm = _RecordingRM()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=interceptors(str(tmp_path / "tokens.txt")))
    mgrpc.add_RewardServiceServicer_to_server(rm, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert _scoring_errors(port, rm, "with token", rm_token=TOKENS["client"]) == 0 and rm.seen == ["with token"]
        assert _scoring_errors(port, rm, "without", rm_token="") == 1 and rm.seen == ["with token"]
    finally:
        server.stop(0)


def test_served_scoring_reaches_an_rm_server_over_tls(tmp_path):
    """--rm-tls-ca: served scoring verifies a TLS RM server against the CA and scores through it; without
    the CA (plaintext to a TLS port) every call fails and is counted as a scoring error, not raised."""
    from concurrent import futures

    from serve.config import ServerConfig
    key, cert = _self_signed(tmp_path)
    rm = _RecordingRM()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    mgrpc.add_RewardServiceServicer_to_server(rm, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    try:
        assert _scoring_errors(port, rm, "over tls", rm_tls_ca=str(tmp_path / "cert.pem")) == 0 and rm.seen == ["over tls"]
        assert _scoring_errors(port, rm, "plaintext", rm_tls_ca="") == 1 and rm.seen == ["over tls"]
    finally:
        server.stop(0)
    with pytest.raises(ValueError, match="rm_tls_ca"):
        ServerConfig(rm_tls_ca=str(tmp_path / "missing.pem"))
