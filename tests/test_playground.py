"""The browser playground in a real headless Chromium (Debian's, driven by Playwright, which
downloads no browser of its own): the page loads from a served app, captions the sample picture,
draws, shows the API's own error messages, asks for an API key when keys are configured, plays
generated sound and video, and sends a microphone recording.

The shapes preset is deployed once for the module as its own app under ``/playground-shapes``,
beside the session's tiny app, because its answers are real: the caption names the sample's colour
and shape, and the README's examples, asked of the same app over HTTP first, get the README's
answers. It is deployed with an API key, so the key's path is tested without a second deployment;
the other tests' pages hold the key from the start. It is deleted with the module: a session-long
app slowed the replicas other modules start. Screenshots are written to
``out/playground/`` as test artefacts.
"""

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

from omnistage.pipelines.demo import sample_files
from omnistage.pipelines.shapes import dominant_colour

pytestmark = pytest.mark.slow

SHAPES_APP = "playground-shapes"
API_KEY = "playground-key"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "out" / "playground"
# The network is closed here: without the background-networking flags Chromium keeps trying to
# reach its update and sync services. The fake media flags give it a microphone that plays a tone
# and grant the page access to it without a prompt.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]
# Long enough for an answer with generated media on two busy cores.
ANSWER_TIMEOUT_MS = 60_000


@pytest.fixture(scope="session")
def chromium():
    """The browser's path. Session-scoped so that, without one, tests skip before any app deploys."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("no chromium on PATH: `make test` installs Debian's as root (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser(chromium, serve_url):
    # The session's app is deployed first: deploying waits on Serve handles, which refuse to
    # block while Playwright's sync API holds an event loop on this thread.
    with sync_playwright() as playwright:
        # launch() starts from a fresh, temporary profile each time.
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shapes_url(ray_session):
    from conftest import SERVE_PORT
    from ray import serve

    from omnistage.cluster.config import load_config
    from omnistage.pipelines.serve import build_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMNISTAGE_API_KEYS", API_KEY)  # read when the app is built
        app = build_app(load_config("shapes"))
    serve.start(http_options={"host": "127.0.0.1", "port": SERVE_PORT})
    serve.run(app, name=SHAPES_APP, route_prefix=f"/{SHAPES_APP}")
    yield f"http://127.0.0.1:{SERVE_PORT}/{SHAPES_APP}/"
    serve.delete(SHAPES_APP)


@pytest.fixture()
def open_page(browser):
    """``open_page(url, key=None)``: the playground in a new browser context (its own session
    storage, holding ``key`` as if entered), once it has read the model; JavaScript errors on the
    page fail the test."""
    contexts, errors = [], []

    def open_(url, key=None, ready="#send:not([disabled])"):
        context = browser.new_context(viewport={"width": 1200, "height": 1000})
        contexts.append(context)
        if key:
            context.add_init_script(f"sessionStorage.setItem('omnistage-api-key', {json.dumps(key)})")
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(error))
        page.goto(url)
        page.wait_for_selector(ready)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"expected no JavaScript errors, got {errors}"


def _answer(page, index):
    """Assistant turn ``index`` (0 for the first), once it has finished (done or error)."""
    turn = page.locator(".turn.assistant").nth(index)
    turn.locator("xpath=self::*[@data-state='done' or @data-state='error']").wait_for(timeout=ANSWER_TIMEOUT_MS)
    return turn


def _screenshot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    assert Image.open(path).format == "PNG"


def test_readme_examples_through_serve(shapes_url, tmp_path):
    """The README's requests, on the default preset served as its own app: the sample picture's,
    sound's and video's captions, a drawn blue square, a long low buzz and a red circle moving up."""
    from omnistage.actors.media import decode_audio, decode_video
    from omnistage.clients.cli import main
    from omnistage.pipelines import shapes

    assert main(["samples", str(tmp_path)]) == 0
    image, audio, video = (base64.b64encode((tmp_path / name).read_bytes()).decode() for name in ("sample.png", "sample.wav", "sample.mp4"))

    def ask(client, part: dict, question: str) -> str:
        response = client.post("/chat/completions", json={
            "model": "omnistage-shapes", "max_tokens": 16,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": question}]}],
        })
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    def make(client, prompt: str, modality: str) -> bytes:
        response = client.post("/chat/completions", json={
            "model": "omnistage-shapes", "modalities": ["text", modality], "seed": 0,
            "messages": [{"role": "user", "content": prompt}],
        })
        assert response.status_code == 200, response.text
        return base64.b64decode(response.json()["choices"][0]["message"]["media"][0]["data"])

    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=f"{shapes_url}v1", headers=headers, timeout=120) as client:
        image_part = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
        assert ask(client, image_part, "What is in this image?") == "a big red circle on the left"
        audio_part = {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}
        assert ask(client, audio_part, "What do you hear?") == "two short high whistles"
        video_part = {"type": "video_url", "video_url": {"url": f"data:video/mp4;base64,{video}"}}
        assert ask(client, video_part, "What happens in this video?") == "a green square moving to the right"
        drawing = client.post("/images/generations", json={"model": "omnistage-shapes", "prompt": "Draw a blue square", "seed": 0})
        buzz = decode_audio(make(client, "Play a long low buzz", "audio"))
        clip = decode_video(make(client, "Make a video of a red circle moving up", "video"))
    assert drawing.status_code == 200, drawing.text
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(drawing.json()["data"][0]["b64_json"]))).convert("RGB"))
    assert picture.shape == (64, 64, 3) and shapes.dominant_colour(picture) == "blue"
    assert shapes.pitch_of(buzz.samples, buzz.sampling_rate) == "low"
    assert shapes.length_of(buzz.samples, buzz.sampling_rate) == "long"
    assert clip.shape == (8, 32, 32, 3) and shapes.dominant_colour(clip) == "red"


def _data_url_bytes(url, mime):
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix), f"expected a {mime} data URL, got {url[:40]!r}"
    return base64.b64decode(url[len(prefix):])


def test_caption_the_attached_sample_picture(open_page, shapes_url):
    page = open_page(shapes_url, key=API_KEY)
    assert page.inner_text("#model-name") == "omnistage-shapes"
    assert "colours: red, green, blue" in page.inner_text("#world")
    page.set_input_files("#files", files=[{"name": "sample.png", "mimeType": "image/png", "buffer": sample_files()["sample.png"]}])
    assert page.locator("#attachments .chip").inner_text().startswith("image: sample.png")  # read asynchronously
    page.fill("#prompt", "What is in this image?")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    body = json.loads(sent.value.post_data)
    # The settings beside the chat, as the page starts.
    assert {k: v for k, v in body.items() if k != "messages"} == {
        "model": "omnistage-shapes", "modalities": ["text"], "stream": True,
        "max_tokens": 32, "seed": 0, "temperature": 0,
    }
    assert [part["type"] for part in body["messages"][0]["content"]] == ["image_url", "text"]
    answer = _answer(page, 0)
    assert answer.get_attribute("data-state") == "done"
    assert answer.locator(".text").inner_text() == "a big red circle on the left"
    assert page.locator(".turn.user img.attached").count() == 1


def test_drawing_example_shows_a_png(open_page, shapes_url):
    page = open_page(shapes_url, key=API_KEY)
    assert not page.locator("button.example:disabled").count()  # the default preset has every modality
    page.get_by_role("button", name="Caption the sample picture").click()
    assert _answer(page, 0).locator(".text").inner_text() == "a big red circle on the left"
    page.get_by_role("button", name="Draw a blue square").click()
    image = _answer(page, 1).locator("img.media")
    picture = Image.open(io.BytesIO(_data_url_bytes(image.get_attribute("src"), "image/png")))
    assert picture.format == "PNG" and picture.size == (64, 64)
    assert dominant_colour(np.asarray(picture.convert("RGB"))) == "blue"
    assert image.evaluate("img => img.complete && img.naturalWidth") == 64  # the browser decoded it too
    _screenshot(page, "caption-and-drawing")


def test_bad_upload_shows_the_api_message(open_page, shapes_url):
    page = open_page(shapes_url, key=API_KEY)
    broken = b"\x89PNG\r\n\x1a\n not a picture"
    page.set_input_files("#files", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": broken}])
    page.wait_for_selector("#attachments .chip")
    page.fill("#prompt", "What is in this image?")
    page.click("#send")
    shown = _answer(page, 0).locator(".error").inner_text()
    # The same request straight to the API: the page shows its message, word for word.
    url = "data:image/png;base64," + base64.b64encode(broken).decode()
    direct = httpx.post(f"{shapes_url}v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this image?"}]}]},
        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert direct.status_code == 400 and shown == direct.json()["error"]["message"]
    assert "Traceback" not in page.content()
    _screenshot(page, "bad-upload")
    # The failed turn is not sent again: the next question is answered.
    page.get_by_role("button", name="Caption the sample picture").click()
    assert _answer(page, 1).locator(".text").inner_text() == "a big red circle on the left"


def test_generated_sound_and_video_play_and_the_microphone_records(open_page, serve_url):
    page = open_page(f"{serve_url}/")
    assert page.inner_text("#model-name") == "omnistage-tiny"
    assert not page.locator("button.example:disabled").count()
    page.check("#out-audio")
    page.check("#out-video")
    page.fill("#prompt", "make a sound and a video")
    page.click("#send")
    answer = _answer(page, 0)
    assert answer.get_attribute("data-state") == "done"
    # The browser itself decodes both: their durations are known once their metadata loads.
    for tag, mime in (("audio", "audio/wav"), ("video", "video/mp4")):
        media = answer.locator(f"{tag}.media")
        assert media.get_attribute("data-mime") == mime
        duration = media.evaluate(
            "m => m.readyState >= 1 ? m.duration : new Promise(ok => { m.onloadedmetadata = () => ok(m.duration); m.onerror = () => ok(-1); })"
        )
        assert duration > 0, f"expected the browser to play the generated {tag}"
    _screenshot(page, "sound-and-video")
    # A recording from the fake microphone is WebM, which the API does not read: the page sends it
    # as WAV, and the tiny model answers.
    page.uncheck("#out-audio")
    page.uncheck("#out-video")
    page.click("#recording")
    page.wait_for_selector("#recording[data-on='true']")
    page.wait_for_timeout(500)  # half a second of the fake microphone's tone
    page.click("#recording")
    page.wait_for_selector("#attachments .chip")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    (audio,) = [p for p in json.loads(sent.value.post_data)["messages"][-1]["content"] if p["type"] == "input_audio"]
    assert audio["input_audio"]["format"] == "wav" and base64.b64decode(audio["input_audio"]["data"])[:4] == b"RIFF"
    assert _answer(page, 1).get_attribute("data-state") == "done"


def test_with_api_keys_the_page_asks_for_one(open_page, shapes_url):
    page = open_page(shapes_url, ready="#key-panel:not([hidden])")
    page.wait_for_selector("#banner:has-text('invalid or missing API key')")
    assert page.is_disabled("#send")
    page.fill("#api-key", API_KEY)
    page.click("#key-save")
    page.wait_for_selector("#send:not([disabled])")
    assert page.inner_text("#model-name") == "omnistage-shapes"
    with page.expect_request("**/v1/chat/completions") as sent:
        page.get_by_role("button", name="Caption the sample picture").click()
    assert sent.value.headers["authorization"] == f"Bearer {API_KEY}"
    assert _answer(page, 0).locator(".text").inner_text() == "a big red circle on the left"
    # The key is kept for this tab only.
    assert page.evaluate("sessionStorage.length") == 1 and page.evaluate("localStorage.length") == 0
