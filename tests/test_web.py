"""The web gateway end to end: a real headless Chromium (Debian's, driven by Playwright) on the chat
and labeling pages, against a real policy server, feedback service, Kafka broker and the trainer's
consumer. Every check reads what arrived in the consumer's store."""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import expect

from feedback.consumer import ConsumerConfig, FeedbackConsumer
from rlhf.v1 import feedback_pb2 as fb
from tests.helpers import REPO, ServerProc, free_port, start_feedback_service, start_policy_server
from web.access import pseudonym

CHROMIUM = "/usr/bin/chromium"   # Debian's package (scripts/setup.sh installs it); no browser download
TOKENS = {"client": "web-client-4Hq8s1", "labeler": "web-labeler-9Rk2w7", "admin": "web-admin-0Tz5m3"}
PROMPTS = ["What is a good way to learn to cook?", "How do plants make food?", "Can you suggest a name for a cat?"]
# RLHF_SAVE_SCREENSHOTS=1 refreshes the README's screenshots (docs/img); otherwise they go to the test's tmp dir
SCREENSHOTS = REPO / "docs" / "img" if os.environ.get("RLHF_SAVE_SCREENSHOTS") else None


def _gateway(tmp: Path, policy: str, feedback: str) -> tuple[ServerProc, str]:
    (tmp / "tokens.txt").write_text("".join(f"{t} {r}\n" for r, t in TOKENS.items()))
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    proc = ServerProc("web", ["--policy", policy, "--feedback", feedback, "--port", str(free_port()),
                              "--auth-tokens", str(tmp / "tokens.txt"), "--prompts", str(tmp / "prompts.txt"),
                              "--max-new-tokens", "16", "--label-k", "4"], r"web gateway listening on (\S+)")
    return proc, proc.match.group(1)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    expect.set_options(timeout=60_000)   # a generation on 2 shared cores can take seconds
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _page(browser):
    ctx = browser.new_context(viewport={"width": 1180, "height": 820})
    ctx.set_default_timeout(60_000)
    return ctx.new_page()


def _sign_in(page, base: str, path: str, token: str) -> None:
    page.goto(base + path)
    page.fill("input[name=token]", token)
    page.click("form button.primary")
    page.wait_for_url(base + path)


def _screenshot(page, name: str, tmp: Path) -> None:
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str((SCREENSHOTS or tmp) / name), full_page=True)


# ---- sign-in: the gateway alone (nothing behind it is called) ----

def test_missing_or_wrong_token_gets_the_sign_in_page_and_no_token_leaks(browser, tmp_path):
    proc, base = _gateway(tmp_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    try:
        page = _page(browser)
        first = page.goto(base + "/chat")
        assert first.status == 401 and page.locator("input[name=token]").is_visible()
        page.fill("input[name=token]", "not-a-token")
        with page.expect_response(base + "/signin") as r:
            page.click("form button.primary")
        assert r.value.status == 401
        assert page.locator("#signin-message").inner_text() == "That token is not valid."
        page.fill("input[name=token]", TOKENS["labeler"])   # a real token, for the other page
        page.click("form button.primary")
        assert "needs a client token" in page.locator("#signin-message").inner_text()
        assert page.context.cookies() == []   # nothing stored for a refused token
        api = page.request.post(base + "/api/feedback/chat", data={"items": []})
        assert api.status == 401 and api.json()["error"] == "sign in"
        _sign_in(page, base, "/label", TOKENS["labeler"])
        cookie, = page.context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKENS["labeler"] not in page.url
        assert page.evaluate("document.cookie") == ""   # the page's scripts cannot read the token
        body = page.content()
        assert "Traceback" not in body and "Label" in page.title()
        page.context.close()
        assert not any(t in proc.output() for t in [*TOKENS.values(), "not-a-token"]), proc.output()[-2000:]
    finally:
        proc.stop()


def _post(base: str, path: str, body: bytes, headers: dict, chunked: bool = False) -> tuple[int, dict]:
    """A raw POST (http.client: any header, or a chunked body) -> (status, JSON answer)."""
    import http.client
    import json
    from urllib.parse import urlsplit
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        if chunked:
            conn.putrequest("POST", path)
            for k, v in {**headers, "Transfer-Encoding": "chunked"}.items():
                conn.putheader(k, v)
            conn.endheaders()
            try:
                for i in range(0, len(body), 65536):   # the gateway may answer and close before the end
                    part = body[i:i + 65536]
                    conn.send(b"%x\r\n%s\r\n" % (len(part), part))
                conn.send(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
        else:
            conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def test_gateway_refuses_other_sites_posts_non_json_oversized_and_malformed_bodies(tmp_path):
    """The gateway alone (nothing behind it is called: every one of these is refused before it would be)."""
    proc, base = _gateway(tmp_path, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    try:
        signed_in = {"Cookie": f"rlhf_token={TOKENS['labeler']}", "Content-Type": "application/json"}
        item = {"kind": "rating", "event_id": "rate-0123456789", "prompt": "p", "response_id": "r1", "likert": 3}
        body = lambda **kw: __import__("json").dumps({"items": [{**item, **kw}]}).encode()  # noqa: E731
        # another site's page: by Sec-Fetch-Site, or by Origin where the browser sends no Sec-Fetch-Site
        assert _post(base, "/api/feedback/label", body(), {**signed_in, "Sec-Fetch-Site": "cross-site"})[0] == 403
        assert _post(base, "/api/feedback/label", body(), {**signed_in, "Sec-Fetch-Site": "same-site"})[0] == 403
        assert _post(base, "/api/feedback/label", body(), {**signed_in, "Origin": "http://evil.example"})[0] == 403
        assert _post(base, "/signin", b"token=x&next=chat", {"Origin": "http://evil.example",
                     "Content-Type": "application/x-www-form-urlencoded"})[0] == 403
        # a form or no-cors post (text/plain) is not JSON: refused before it is read
        status, ans = _post(base, "/api/feedback/label", body(), {**signed_in, "Content-Type": "text/plain"})
        assert status == 415 and ans["retry"] is False
        # oversized: by Content-Length, and streamed in chunks with none
        big = b'{"items": [' + b" " * 300_000 + b"]}"
        assert _post(base, "/api/feedback/label", big, signed_in)[0] == 413
        assert _post(base, "/api/feedback/label", big, signed_in, chunked=True)[0] == 413
        assert _post(base, "/signin", b"token=" + b"x" * 10_000, {"Content-Type": "application/x-www-form-urlencoded"},
                     chunked=True)[0] == 413
        # well-formed JSON the protobuf messages cannot hold: 400 naming the field, not a 500
        for bad, field in [(body(likert=2 ** 40), "likert"), (body(created_unix_ms=2 ** 64), "created_unix_ms"),
                           (body(prompt="\ud800"), "prompt"), (body(response_id="\udc00"), "response_id"),
                           (b"[" * 100_000 + b"]" * 100_000, "body")]:
            status, ans = _post(base, "/api/feedback/label", bad, signed_in)
            assert status == 400 and ans["retry"] is False and field in ans["error"], (field, status, ans)
        # the page's own kind of request still gets through to the backends (not running here: 503)
        status, ans = _post(base, "/api/feedback/label", body(), {**signed_in, "Sec-Fetch-Site": "same-origin",
                                                                   "Origin": base})
        assert status not in (400, 403, 413, 415) and ans["saved"] is False, (status, ans)
        assert "Traceback" not in proc.output()
    finally:
        proc.stop()


def test_main_job_web_port_starts_an_open_gateway(tmp_path):
    """python -m online --web-port N: its hook starts the gateway beside the servers (no tokens there)."""
    import urllib.request

    from online.__main__ import OnlineConfig, start_web
    (tmp_path / "logs").mkdir()
    port = free_port()
    policy = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"    # two policy replicas' addresses
    web = start_web(OnlineConfig(web_port=port), tmp_path, {"policy_targets": policy, "feedback": free_port()})
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/label", timeout=10) as r:
            assert r.status == 200 and "rlhf_person=anon-" in r.headers["set-cookie"]
    finally:
        web.stop()


# ---- end to end: the whole stack ----

@dataclass
class Stack:
    base: str
    broker: object     # feedback.broker.BrokerConfig: the broker-down test stops and restarts it
    consumer: FeedbackConsumer
    version: str
    gateway: ServerProc

    def records(self) -> list[fb.FeedbackRecord]:
        return [fb.FeedbackRecord.FromString(v) for _, v in self.consumer.store.records()]

    def wait_for(self, pred, n: int, timeout: float = 60.0) -> list[fb.FeedbackRecord]:
        """The stored records matching pred, once there are n of them and the consumer has read
        everything in the topics (so a duplicate still in flight would have been counted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.consumer.poll_once(timeout_ms=200)
            got = [r for r in self.records() if pred(r)]
            if len(got) >= n and self.consumer.lag() == 0:
                return got
        raise TimeoutError(f"{len([r for r in self.records() if pred(r)])} matching records stored, expected {n}")

    def wait_for_interactions(self, response_ids: set[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.consumer.poll_once(timeout_ms=200)
            stored = {fb.Interaction.FromString(v).response_id for _, v in self.consumer.store.records("interactions")}
            if response_ids <= stored:
                return
        raise TimeoutError("the served responses did not reach the interactions topic")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_hh_policy):
    """Its own broker (the last test stops and restarts it; the session's shared one must stay up),
    the policy server logging to it, the feedback service, the gateway and the trainer's consumer."""
    from feedback.broker import BrokerConfig, start, stop
    from feedback.topics import ensure_topics
    from serve.client import PolicyClient
    tmp = tmp_path_factory.mktemp("web")
    broker = BrokerConfig(data_dir=tmp / "kafka", port=free_port(), controller_port=free_port())
    start(broker)
    procs = []
    try:
        ensure_topics(broker.bootstrap)
        policy, pport, _ = start_policy_server(tiny_hh_policy, kafka_bootstrap=broker.bootstrap, threads=1,
                                               max_batch_size=8)
        procs.append(policy)
        feedback, fport = start_feedback_service(broker.bootstrap, kafka_timeout_s=2.0, response_lookup_wait_s=5.0)
        procs.append(feedback)
        gateway, base = _gateway(tmp, f"127.0.0.1:{pport}", f"127.0.0.1:{fport}")
        procs.append(gateway)
        with PolicyClient(f"127.0.0.1:{pport}") as c:
            version = c.info().model_version
        # the trainer's mode (every partition assigned, no group membership): it reads on across the
        # broker restart of the last test
        consumer = FeedbackConsumer(ConsumerConfig(db=tmp / "store.db", bootstrap=broker.bootstrap,
                                                   group=f"web-{uuid.uuid4().hex}"), manual_assign=True)
        yield Stack(base, broker, consumer, version, gateway)
        consumer.close()
    finally:
        for p in reversed(procs):
            p.stop()
        stop(broker)


def _ask(page, text: str) -> list[dict]:
    """Sends a chat message and waits for both samples: [{response_id, text, version}] for A and B."""
    page.fill("#message", text)
    page.press("#message", "Enter")
    page.wait_for_selector(".picks button[data-choice=a], #turn .notice.error")
    assert page.locator("#turn .notice.error").count() == 0, page.locator("#turn").inner_text()
    samples = []
    for i in (0, 1):
        s = page.locator(f"#turn .sample[data-index='{i}']")
        samples.append({"response_id": s.get_attribute("data-response-id"), "text": s.locator("p.text").text_content(),
                        "version": s.locator(".version").inner_text()})
    return samples


def _pick(page, choice: str, strength: str, turns_after: int) -> None:
    page.click(f".picks button[data-choice='{choice}'][data-strength='{strength}']")
    expect(page.locator("#log .msg.assistant")).to_have_count(turns_after)


def _comparisons_of(samples):
    ids = (samples[0]["response_id"], samples[1]["response_id"])
    return lambda r: r.feedback.HasField("comparison") and (r.feedback.comparison.a.response_id,
                                                             r.feedback.comparison.b.response_id) == ids


@pytest.mark.slow
def test_chat_two_turns_each_pick_stored_with_ids_version_role_strength(stack, browser, tmp_path):
    page = _page(browser)
    _sign_in(page, stack.base, "/chat", TOKENS["client"])
    first = _ask(page, "Hello! What should I cook tonight?")
    assert {s["version"] for s in first} == {stack.version} and first[0]["response_id"] != first[1]["response_id"]
    _pick(page, "b", "clearly", 1)
    assert page.locator("#log .msg.assistant p").text_content() == first[1]["text"].strip()
    second = _ask(page, "Something with rice, please.")
    _screenshot(page, "web-chat.png", tmp_path)
    _pick(page, "a", "slightly", 2)
    page.click("#log .msg.assistant >> nth=0 >> button.thumb.down")   # a rating on an earlier turn
    page.wait_for_selector("#log .msg.assistant >> nth=0 >> .saved")

    (c1,), (c2,) = stack.wait_for(_comparisons_of(first), 1), stack.wait_for(_comparisons_of(second), 1)
    user = fb.Source(kind=fb.SOURCE_KIND_USER, id=pseudonym(TOKENS["client"]))
    for rec, samples, choice, strength in ((c1, first, fb.Comparison.CHOICE_B, fb.Comparison.STRENGTH_CLEARLY_BETTER),
                                           (c2, second, fb.Comparison.CHOICE_A, fb.Comparison.STRENGTH_SLIGHTLY_BETTER)):
        c = rec.feedback.comparison
        assert (c.preferred, c.strength, c.source) == (choice, strength, user)
        assert [c.a.text, c.b.text] == [s["text"] for s in samples]   # resolved from the interactions log
        assert c.a.model_version == c.b.model_version == stack.version
    # the prompts are what the policy saw: the hh chat template over the conversation, the chosen answer in it
    assert c1.feedback.comparison.prompt == "\n\nHuman: Hello! What should I cook tonight?\n\nAssistant:"
    assert c2.feedback.comparison.prompt == ("\n\nHuman: Hello! What should I cook tonight?\n\nAssistant: "
                                             f"{first[1]['text'].strip()}\n\nHuman: Something with rice, please."
                                             "\n\nAssistant:")
    rating, = stack.wait_for(lambda r: r.feedback.HasField("rating")
                             and r.feedback.rating.response.response_id == first[1]["response_id"], 1)
    assert rating.feedback.rating.WhichOneof("score") == "thumbs_up" and not rating.feedback.rating.thumbs_up
    assert rating.feedback.rating.prompt == c1.feedback.comparison.prompt
    page.context.close()


@pytest.mark.slow
def test_chat_both_bad_rates_both_down_and_asks_again_then_a_tie_goes_on_with_a(stack, browser):
    page = _page(browser)
    _sign_in(page, stack.base, "/chat", TOKENS["client"])
    bad = _ask(page, "Where do rainbows come from?")
    page.click(".picks button[data-choice='bad']")
    page.wait_for_selector(".picks button[data-choice=tie]:enabled")   # a new pair, open for a pick
    tie = [page.locator(f"#turn .sample[data-index='{i}']").get_attribute("data-response-id") for i in (0, 1)]
    assert page.locator("#log .msg.assistant").count() == 0 and not set(tie) & {s["response_id"] for s in bad}
    _pick(page, "tie", "", 1)
    assert page.locator("#log .msg.assistant").get_attribute("data-response-id") == tie[0]

    downs = stack.wait_for(lambda r: r.feedback.HasField("rating")
                           and r.feedback.rating.response.response_id in {s["response_id"] for s in bad}, 2)
    user = fb.Source(kind=fb.SOURCE_KIND_USER, id=pseudonym(TOKENS["client"]))
    assert len(downs) == 2 and all(r.feedback.rating.WhichOneof("score") == "thumbs_up"
                                   and not r.feedback.rating.thumbs_up and r.feedback.rating.source == user for r in downs)
    c, = stack.wait_for(_comparisons_of([{"response_id": t} for t in tie]), 1)
    assert (c.feedback.comparison.preferred, c.feedback.comparison.strength) == (
        fb.Comparison.CHOICE_TIE, fb.Comparison.STRENGTH_UNSPECIFIED)
    assert c.feedback.comparison.prompt == downs[0].feedback.rating.prompt   # the same question, asked again
    page.context.close()


@pytest.mark.slow
def test_chat_both_bad_after_a_thumbs_up_rates_only_the_other_down(stack, browser):
    page = _page(browser)
    _sign_in(page, stack.base, "/chat", TOKENS["client"])
    samples = _ask(page, "How tall do sunflowers grow?")
    page.click("#turn .sample[data-index='0'] button.thumb.up")
    page.wait_for_selector("#turn .sample[data-index='0'] .saved")
    page.click(".picks button[data-choice='bad']")
    page.wait_for_selector(".picks button[data-choice=tie]:enabled")   # asked again
    a, b = samples[0]["response_id"], samples[1]["response_id"]
    rated = stack.wait_for(lambda r: r.feedback.HasField("rating") and r.feedback.rating.response.response_id in (a, b), 2)
    thumbs = sorted((r.feedback.rating.response.response_id, r.feedback.rating.thumbs_up) for r in rated)
    assert thumbs == sorted([(a, True), (b, False)])   # one rating of each: A keeps its thumbs up
    page.context.close()


@pytest.mark.slow
def test_labeling_reload_while_the_next_item_loads_and_a_refused_submission(stack, browser):
    page = _labeling_page(stack, browser)
    first = _ranking_ids(page)
    page.route("**/api/label/item", lambda route: None)   # the next item never comes...
    page.click("#submit")
    expect(page.locator("#count")).to_have_text("1")
    expect(page.locator("#item")).to_contain_text("Loading the next prompt")
    page.unroute("**/api/label/item")
    page.reload()                                         # ...and the labeler reloads meanwhile
    page.wait_for_selector("#ranking li.card >> nth=3")
    expect(page.locator("#count")).to_have_text("1")
    assert _ranking_ids(page) != first and page.locator("#submit").is_enabled()
    # a submission the service refuses (here an unknown response id, answered by a stand-in for the
    # gateway): it is not offered for a retry, and the labeler can skip the item or rank it again
    page.route("**/api/feedback/label", lambda route: route.fulfill(
        status=400, content_type="application/json",
        body='{"saved": false, "retry": false, "error": "items[0].response_ids: unknown response id"}'))
    page.click("#submit")
    expect(page.locator(".notice.refused")).to_contain_text("unknown response id")
    assert page.locator(".notice .retry").count() == 0
    expect(page.locator("#skip")).to_be_enabled()
    expect(page.locator("#submit")).to_be_enabled()
    second = _ranking_ids(page)
    page.unroute("**/api/feedback/label")
    page.click("#skip")
    page.wait_for_function("ids => document.querySelectorAll('#ranking li.card').length === 4 && "
                           "document.querySelector('#ranking li.card').dataset.responseId !== ids[0]", arg=second)
    expect(page.locator("#count")).to_have_text("1")
    page.context.close()


def _labeling_page(stack, browser):
    """A labeler signed in on the labeling page, its first item's four responses shown."""
    page = _page(browser)
    _sign_in(page, stack.base, "/label", TOKENS["labeler"])
    page.wait_for_selector("#ranking li.card >> nth=3")
    return page


def _ranking_ids(page) -> list[str]:
    return page.eval_on_selector_all("#ranking li.card", "els => els.map(e => e.dataset.responseId)")


@pytest.mark.slow
def test_labeling_ranking_of_four_with_likert_arrives_as_one_ranking_and_four_ratings(stack, browser, tmp_path):
    page = _labeling_page(stack, browser)
    served = _ranking_ids(page)
    assert len(set(served)) == 4
    page.focus("#ranking li.card >> nth=3")
    for _ in range(3):                        # keys: the last response to the top
        page.keyboard.press("ArrowUp")
    assert _ranking_ids(page) == [served[3], served[0], served[1], served[2]]
    page.drag_and_drop("#ranking li.card >> nth=2", "#ranking li.card >> nth=1")   # and a drag
    order = _ranking_ids(page)
    assert order == [served[3], served[1], served[0], served[2]]
    scores = dict(zip(order, (7, 5, 3, 1)))
    for rid, v in scores.items():
        page.click(f"#ranking li[data-response-id='{rid}'] .likert input[value='{v}']")
    prompt = page.locator(".prompt p").text_content()
    _screenshot(page, "web-label.png", tmp_path)
    page.click("#submit")
    expect(page.locator("#count")).to_have_text("1")

    ranking, = stack.wait_for(lambda r: r.feedback.HasField("ranking")
                              and r.feedback.ranking.responses[0].response_id == order[0], 1)
    rk = ranking.feedback.ranking
    labeler = fb.Source(kind=fb.SOURCE_KIND_LABELER, id=pseudonym(TOKENS["labeler"]))
    assert [r.response_id for r in rk.responses] == order and rk.source == labeler
    assert prompt in PROMPTS and rk.prompt == f"\n\nHuman: {prompt}\n\nAssistant:"
    assert {r.model_version for r in rk.responses} == {stack.version}
    ratings = stack.wait_for(lambda r: r.feedback.HasField("rating")
                             and r.feedback.rating.response.response_id in scores, 4)
    assert {r.feedback.rating.response.response_id: r.feedback.rating.likert for r in ratings} == scores
    assert all(r.feedback.rating.source == labeler and r.feedback.rating.prompt == rk.prompt for r in ratings)
    page.context.close()


@pytest.mark.slow
def test_double_submit_and_a_resent_submission_store_once(stack, browser):
    page = _labeling_page(stack, browser)
    ids = _ranking_ids(page)
    with page.expect_request(stack.base + "/api/feedback/label") as req:
        page.dblclick("#submit")
    expect(page.locator("#count")).to_have_text("1")
    sent = req.value.post_data_json
    # the same submission again, as a page would resend it when an answer is lost: same event ids
    again = page.evaluate("""body => fetch('/api/feedback/label', {method: 'POST', body: JSON.stringify(body),
                             headers: {'Content-Type': 'application/json'}}).then(r => r.json())""", sent)
    assert again["saved"] is True and again["event_ids"] == [sent["items"][0]["event_id"]]
    stored = stack.wait_for(lambda r: r.feedback.HasField("ranking")
                            and [x.response_id for x in r.feedback.ranking.responses] == ids, 1)
    assert [r.event_id for r in stored] == [sent["items"][0]["event_id"]]
    page.context.close()


@pytest.mark.slow
def test_broker_down_the_page_says_not_saved_and_a_retry_after_restart_stores_once(stack, browser):
    """Last in the module: it stops the module's broker."""
    from feedback.broker import start, stop
    page = _page(browser)
    _sign_in(page, stack.base, "/chat", TOKENS["client"])
    samples = _ask(page, "Tell me about the sea.")
    stack.wait_for_interactions({s["response_id"] for s in samples})   # servable ids before Kafka goes
    stop(stack.broker)
    page.click(".picks button[data-choice='a'][data-strength='clearly']")
    page.wait_for_selector(".notice.error, #log .msg.assistant")   # whichever comes: it must be the error
    assert page.locator("#log .msg.assistant").count() == 0 and page.locator(".notice.saved").count() == 0
    assert "Not saved" in page.locator(".notice.error").inner_text()
    start(stack.broker)
    deadline = time.monotonic() + 60
    while page.locator("#log .msg.assistant").count() == 0:   # a person retrying until it goes through
        assert time.monotonic() < deadline, page.locator(".notice").all_inner_texts()
        page.click(".notice.error button.retry")
        expect(page.locator(".notice.sending")).to_have_count(0)
        time.sleep(1.0)
    stored = stack.wait_for(_comparisons_of(samples), 1)
    assert len(stored) == 1 and stored[0].feedback.comparison.preferred == fb.Comparison.CHOICE_A
    page.context.close()


def test_a_batch_partly_saved_is_reported_as_partial():
    """SubmitBatch answering OK for one item and INVALID_ARGUMENT for the other: the page is told
    'partial' (it must not submit the batch anew with new event ids: the saved item would be stored twice)."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor
    from types import SimpleNamespace

    from web.backends import Backends

    class Stub:
        def __init__(self, codes):
            self.codes = codes

        async def SubmitBatch(self, batch, timeout, metadata):
            return SimpleNamespace(results=[SimpleNamespace(code=c, message="unknown response id" if c else "")
                                            for c in self.codes])

    def run(coro):   # on a thread of its own: the browser fixture's Playwright keeps an event loop on this one
        with ThreadPoolExecutor(1) as ex:
            return ex.submit(asyncio.run, coro).result()
    b = object.__new__(Backends)
    b.cfg = SimpleNamespace(feedback_timeout_s=5.0)
    invalid = 3   # grpc.StatusCode.INVALID_ARGUMENT
    for codes, partial in (([0, invalid], True), ([invalid, invalid], False)):
        b.feedback = Stub(codes)
        f = run(b.submit(fb.FeedbackBatch(), ""))
        assert f.json() == {"status": 400, "retry": False, "code": "INVALID_ARGUMENT", "error": "unknown response id",
                            "partial": partial}
    b.feedback = Stub([0, 0])
    assert run(b.submit(fb.FeedbackBatch(), "")) is None


def test_a_backend_that_refuses_the_token_sends_the_page_to_sign_in():
    """The gateway let a token in that a backend refuses (e.g. revoked since): 401, not 403, and in
    a stream's error event too (inside a 200 answer), where chat.js reads `status` to sign in again."""
    import grpc

    from web.backends import Failure
    f = Failure.of(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
    assert (f.http, f.retry, f.json()["status"]) == (401, False, 401)
    assert Failure.of(grpc.StatusCode.PERMISSION_DENIED, "labelers only").json()["status"] == 403
    assert Failure.of(grpc.StatusCode.UNAVAILABLE, "down").json() == {
        "status": 503, "retry": True, "code": "UNAVAILABLE", "error": "down", "partial": False}
