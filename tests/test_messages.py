"""OpenAI-style messages to placeholders and media files (header-checked, decoded by the
encoders), including remote URLs behind an allowlist."""

import base64
import http.server
import threading

import numpy as np
import pytest

from omnistage.actors.errors import InvalidInputError, PayloadTooLargeError, UnsupportedMediaError
from omnistage.actors.media import decode, decoded_counts, encode_png
from omnistage.actors.payloads import EncodedMedia
from omnistage.pipelines.demo import sample_image
from omnistage.pipelines.messages import RemoteMedia, parse_messages

PNG = encode_png(sample_image())


def test_parts_stay_typed_parts_in_order():
    chat = parse_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
                {"type": "input_audio", "input_audio": (np.zeros(1600, np.float32), 16000)},
                {"type": "image_url", "image_url": sample_image()},
            ]},
        ],
        accepted=["image", "audio"],
    )
    assert chat.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare"}, {"type": "image"}, {"type": "audio"}, {"type": "image"}]},
    ]
    assert [m for m, _ in chat.media] == ["image", "audio", "image"]
    # The file stays a file (its encoder decodes it); what a Python caller passed as an array stays one.
    assert isinstance(chat.media[0][1], EncodedMedia) and chat.media[0][1].data == PNG
    np.testing.assert_array_equal(decode(chat.media[0][1]), sample_image())
    np.testing.assert_array_equal(chat.media[2][1], sample_image())


def test_each_medium_keeps_the_text_of_its_message():
    """What an input projector that reads the question gets with the medium's features."""
    image = {"type": "image_url", "image_url": sample_image()}
    chat = parse_messages(
        [
            {"role": "user", "content": [image, {"type": "text", "text": " What is it? "}]},
            {"role": "assistant", "content": "A circle."},
            {"role": "user", "content": [{"type": "text", "text": "And this"}, image, {"type": "text", "text": "one?"}]},
            {"role": "user", "content": [image]},
        ],
        accepted=["image"],
    )
    assert chat.instructions == ["What is it?", "And this\none?", ""]


def test_media_files_are_checked_but_not_decoded():
    from omnistage.actors.media import encode_video, encode_wav
    from omnistage.pipelines.demo import sample_audio, sample_video

    before = decoded_counts()
    chat = parse_messages(
        [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(encode_video(sample_video(12), fps=8)).decode()}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(encode_wav(*sample_audio())).decode(), "format": "wav"}},
        ]}],
        accepted=["image", "video", "audio"],
    )
    assert [type(item) for _, item in chat.media] == [EncodedMedia] * 3
    assert decoded_counts() == before
    assert "data" not in repr(chat.media[0][1])  # request bytes stay out of reprs, so out of logs
    with pytest.raises(InvalidInputError, match="could not be decoded"):
        parse_messages(_image_url("data:image/png;base64," + base64.b64encode(b"\x89PNG junk").decode()), accepted=["image"])


def test_refusals_name_what_was_expected():
    with pytest.raises(UnsupportedMediaError, match=r"is video, but this model accepts \['image'\]"):
        parse_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA=="}}]}], accepted=["image"])
    with pytest.raises(InvalidInputError, match="media only in user messages"):
        parse_messages([{"role": "assistant", "content": [{"type": "image_url", "image_url": sample_image()}]}], accepted=["image"])
    with pytest.raises(InvalidInputError, match="non-empty list of messages, got list"):
        parse_messages([], accepted=["image"])


@pytest.fixture()
def media_server():
    """A loopback HTTP server with one PNG, so remote fetching is tested without a network."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(PNG)
            else:
                self.send_response(302)
                self.send_header("Location", "http://example.com/")
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _image_url(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def test_remote_urls_only_from_allowed_hosts(media_server):
    with pytest.raises(InvalidInputError, match=r"not fetched from '127.0.0.1' \(allowed hosts: none\)"):
        parse_messages(_image_url(f"{media_server}/cat.png"), accepted=["image"])
    allowed = RemoteMedia(allowed_hosts=("127.0.0.1",))
    chat = parse_messages(_image_url(f"{media_server}/cat.png"), accepted=["image"], remote=allowed)
    np.testing.assert_array_equal(decode(chat.media[0][1]), sample_image())
    # A redirect is not followed: it could lead off the allowed hosts.
    with pytest.raises(InvalidInputError, match="answer 200, got 302"):
        parse_messages(_image_url(f"{media_server}/elsewhere"), accepted=["image"], remote=allowed)
    with pytest.raises(PayloadTooLargeError, match="at most 10 bytes"):
        parse_messages(_image_url(f"{media_server}/cat.png"), accepted=["image"], remote=RemoteMedia(("127.0.0.1",), max_bytes=10))


def test_limits_refuse_before_decoding():
    from omnistage.actors.media import encode_video
    from omnistage.cluster.config import InputLimits
    from omnistage.pipelines.demo import sample_video

    png_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode()}}
    with pytest.raises(InvalidInputError, match="at most 2 media items per request, got 3"):
        parse_messages([{"role": "user", "content": [png_part] * 3}], accepted=["image"], limits=InputLimits(max_media_items=2))
    with pytest.raises(PayloadTooLargeError, match=r"at most 100 pixels, got 64x64"):
        parse_messages([{"role": "user", "content": [png_part]}], accepted=["image"], limits=InputLimits(max_image_pixels=100))
    with pytest.raises(UnsupportedMediaError, match="formats"):
        parse_messages([{"role": "user", "content": [png_part]}], accepted=["image"], limits=InputLimits(image_formats=["JPEG"]))
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(encode_video(sample_video(12), fps=8)).decode()}}
    with pytest.raises(PayloadTooLargeError, match="4"):
        parse_messages([{"role": "user", "content": [video]}], accepted=["video"], limits=InputLimits(max_video_frames=4))


@pytest.mark.parametrize(
    "messages,problem",
    [
        ([{"role": "user", "content": [{"type": "img"}]}], "messages.0.content.0: Input tag 'img' found using 'type'"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages.0.content.0.text: Input should be a valid string, got int"),
        ([{"role": "user", "content": 5}], "messages.0.content: expected a string or a list of parts, got int"),
        ([{"role": "tool", "content": "hi"}], "messages.0: Input tag 'tool' found using 'role'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"detail": "low"}}]}], "messages.0.content.0.image_url.url: Field required"),
        ([{"role": "system", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}], "got input_audio in a 'system' message"),
    ],
)
def test_malformed_chats_name_where_and_what(messages, problem):
    with pytest.raises(InvalidInputError, match="^invalid messages: ") as caught:
        parse_messages(messages, accepted=["image", "audio"])
    assert problem in str(caught.value) and type(caught.value) is InvalidInputError


def test_http_requests_and_python_dicts_meet_one_schema():
    from omnistage.pipelines.schemas import ChatCompletionRequest

    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(PNG).decode(), "detail": "low"}},
            {"type": "text", "text": "what is it?"},
        ]},
    ]
    request = ChatCompletionRequest.model_validate({"messages": messages})
    from_http, from_python = (parse_messages(m, accepted=["image"]) for m in (request.messages, messages))
    assert from_http.messages == from_python.messages == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]},
    ]
    assert [item.data for _, item in from_http.media] == [item.data for _, item in from_python.media] == [PNG]
    # The audio format is checked with the media: an unsupported one is a 415, not a malformed chat.
    with pytest.raises(UnsupportedMediaError, match=r"audio format in .*, got 'aiff'"):
        parse_messages([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "aiff"}}]}], accepted=["audio"])
