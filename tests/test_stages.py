"""Encoders, projectors and the LLM on the tiny preset: shapes, dtypes, splicing, signal tokens."""

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from omnistage.actors.errors import InvalidInputError, UnsupportedMediaError
from omnistage.actors.payloads import AudioClip, Embeddings, EncodedMedia, Features, LLMRequest, SignalGroup
from omnistage.cluster.config import (
    AudioEncoderConfig,
    ImageEncoderConfig,
    InputProjectorConfig,
    LLMConfig,
    OutputProjectorConfig,
    VideoEncoderConfig,
)

RNG = np.random.default_rng(0)


def _image(h=40, w=50):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_encoder(tiny_preset):
    from omnistage.actors.image_encoder import ImageEncoder

    return ImageEncoder(ImageEncoderConfig())


@pytest.fixture(scope="module")
def llm(tiny_preset):
    from omnistage.actors.llm import LLM

    return LLM(LLMConfig())


def _user(text):
    return [{"role": "user", "content": text}]


# Encoders


def test_image_encoder_drops_cls_and_picks_layer(image_encoder, tiny_preset):
    from omnistage.actors.image_encoder import ImageEncoder

    images = [_image(), _image(30, 30)]
    out = image_encoder(images)
    assert [f.features.shape for f in out] == [(225, 32), (225, 32)]
    assert out[0].features.dtype == np.float32 and out[0].modality == "image"
    with_cls = ImageEncoder(ImageEncoderConfig(drop_cls=False, feature_layer=-1))(images)
    assert with_cls[0].features.shape == (226, 32)
    assert not np.allclose(with_cls[0].features[1:], out[0].features)  # a different layer


def test_image_encoder_matches_a_direct_forward_of_the_saved_model(image_encoder, tiny_preset):
    from transformers import CLIPVisionModel

    image = _image(30, 30)
    model = CLIPVisionModel.from_pretrained(tiny_preset / "image_encoder").eval()
    pixels = image_encoder.processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][0, 1:].numpy()
    np.testing.assert_allclose(image_encoder([image])[0].features, expected, rtol=1e-5, atol=1e-6)


def test_image_encoder_takes_a_sixteen_bit_png_as_its_eight_bit_twin(image_encoder):
    from PIL import Image

    gray = RNG.integers(0, 256, (30, 30), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray.astype(np.uint16) * 257).save(buffer, format="PNG")  # 257 maps 0..255 onto 0..65535
    sixteen_bit, eight_bit = image_encoder(
        [EncodedMedia("image", buffer.getvalue()), np.repeat(gray[:, :, None], 3, axis=2)]
    )
    np.testing.assert_allclose(sixteen_bit.features, eight_bit.features, rtol=1e-5, atol=1e-6)


def test_image_encoder_rejects_wrong_mode(image_encoder):
    with pytest.raises(InvalidInputError, match=r"shape \(4, 4, 4\)"):
        image_encoder([np.zeros((4, 4, 4), np.uint8)])
    with pytest.raises(InvalidInputError, match=r"shape \(0, 5, 3\)"):
        image_encoder([np.zeros((0, 5, 3), np.uint8)])


def test_video_encoder_samples_five_frames_in_order(tiny_preset, image_encoder):
    from omnistage.actors.media import sample_frame_indices
    from omnistage.actors.video_encoder import VideoEncoder

    assert sample_frame_indices(9, 5).tolist() == [0, 2, 4, 6, 8]
    assert sample_frame_indices(2, 5).tolist() == [0, 0, 0, 1, 1]  # short clips repeat frames
    video = np.stack([_image(30, 30) for _ in range(9)])
    out = VideoEncoder(VideoEncoderConfig())([video, video[:3]])
    assert out[0].features.shape == (5 * 225, 32) and out[0].modality == "video"
    # Frame k of the sample is the image encoder's output for frame 2k.
    per_frame = image_encoder([video[0], video[2], video[8]])
    np.testing.assert_allclose(out[0].features[:225], per_frame[0].features, atol=1e-5)
    np.testing.assert_allclose(out[0].features[225:450], per_frame[1].features, atol=1e-5)
    np.testing.assert_allclose(out[0].features[-225:], per_frame[2].features, atol=1e-5)


def test_video_encoder_rejects_empty_video(tiny_preset):
    from omnistage.actors.video_encoder import VideoEncoder

    with pytest.raises(InvalidInputError, match=r"got shape \(0, 8, 8, 3\)"):
        VideoEncoder(VideoEncoderConfig())([np.zeros((0, 8, 8, 3), np.uint8)])


def test_audio_encoder_resamples_and_downmixes(tiny_preset):
    from omnistage.actors.audio_encoder import AudioEncoder

    encoder = AudioEncoder(AudioEncoderConfig())
    t = np.arange(16000) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    t44 = np.arange(44100) / 44100
    tone44 = (0.3 * np.sin(2 * np.pi * 440 * t44)).astype(np.float32)
    out = encoder(
        [AudioClip(tone, 16000), AudioClip(np.stack([tone44, tone44], axis=1), 44100), AudioClip(tone[:100], 16000)]
    )
    assert [f.features.shape for f in out] == [(50, 16)] * 3
    # The same tone at 44.1 kHz stereo lands close to the 16 kHz mono one after resampling.
    assert np.abs(out[0].features - out[1].features).mean() < 0.1 * np.abs(out[0].features).mean()
    assert not np.allclose(out[0].features, out[2].features)


def test_audio_encoder_takes_files_of_any_width_rate_and_layout(tiny_preset):
    from omnistage.actors.audio_encoder import AudioEncoder

    def wave(rate):
        return 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)

    def file(samples, rate, subtype, fmt="WAV"):
        buffer = io.BytesIO()
        sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
        return EncodedMedia("audio", buffer.getvalue())

    encoder = AudioEncoder(AudioEncoderConfig())
    reference, *from_files = encoder(
        [
            AudioClip(wave(16000).astype(np.float32), 16000),
            file(np.tile(wave(96000)[:, None], 6), 96000, "PCM_24"),  # 96 kHz, 24-bit, 5.1
            file(wave(8000), 8000, "PCM_32"),
            file(np.tile(wave(22050)[:, None], 2), 22050, "DOUBLE"),
        ]
    )
    for features in from_files:
        assert features.features.shape == reference.features.shape
        # This tiny encoder hears little: the tone read at a wrong rate moves its features about 1%.
        assert np.abs(features.features - reference.features).mean() < 1e-3 * np.abs(reference.features).mean()


def test_audio_encoder_rejects_wrong_shape(tiny_preset):
    from omnistage.actors.audio_encoder import AudioEncoder

    with pytest.raises(InvalidInputError):
        AudioEncoder(AudioEncoderConfig())([AudioClip(np.zeros((2, 3, 4), np.float32), 16000)])


# Projectors


@pytest.mark.parametrize(
    "head,length",
    [
        ({"type": "linear"}, 7),
        ({"type": "mlp2x_gelu"}, 7),
        ({"type": "qformer", "num_queries": 4, "qformer": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 20}}, 4),
        ({"type": "resampler", "num_latents": 3, "depth": 1, "num_heads": 2, "head_dim": 4}, 3),
    ],
)
def test_input_projector_types_save_and_load(tmp_path, head, length):
    from omnistage.actors.heads import save_heads
    from omnistage.actors.input_projector import InputProjector

    torch.manual_seed(0)
    config = {"heads": {"image": {**head, "in_dim": 12, "out_dim": 10}}}
    heads = InputProjector.build_heads(config).eval()
    save_heads(heads, config, tmp_path)
    features = RNG.standard_normal((7, 12)).astype(np.float32)
    with torch.no_grad():
        expected = heads["image"](torch.from_numpy(features)[None])[0].numpy()
    stage = InputProjector(InputProjectorConfig(model=str(tmp_path)))
    out = stage([Features("image", features)])[0]
    assert out.embeds.shape == (length, 10) and out.modality == "image"
    np.testing.assert_array_equal(out.embeds, expected)


def test_input_projector_checks_modality_and_width(tiny_preset):
    from omnistage.actors.input_projector import InputProjector

    stage = InputProjector(InputProjectorConfig())
    shapes = [e.embeds.shape for e in stage([Features("image", np.zeros((225, 32), np.float32)), Features("audio", np.zeros((50, 16), np.float32))])]
    assert shapes == [(225, 32), (8, 32)]
    with pytest.raises(InvalidInputError, match=r"shape \(n_tokens, 16\), got \(50, 32\)"):
        stage([Features("audio", np.zeros((50, 32), np.float32))])
    with pytest.raises(UnsupportedMediaError, match="'points'"):
        stage([Features("points", np.zeros((5, 32), np.float32))])


def test_output_projector_shapes(tiny_preset):
    from omnistage.actors.output_projector import OutputProjector

    stage = OutputProjector(OutputProjectorConfig())
    out = stage([SignalGroup("image", np.ones((4, 32), np.float32)), SignalGroup("audio", np.ones((8, 32), np.float32))])
    assert [(c.modality, c.embeds.shape) for c in out] == [("image", (77, 32)), ("audio", (1, 32))]
    assert stage.conditioning_shape("video") == (77, 32)
    with pytest.raises(InvalidInputError, match=r"got \(4, 8\)"):
        stage([SignalGroup("image", np.ones((4, 8), np.float32))])


# LLM


def test_splicing_places_each_medium_at_its_placeholder(llm):
    image = RNG.standard_normal((3, 32)).astype(np.float32)
    audio = RNG.standard_normal((2, 32)).astype(np.float32)
    request = LLMRequest(messages=_user("a <image> b <audio> c"), media=[Embeddings("image", image), Embeddings("audio", audio)])
    got = llm.embed_prompt(request)

    # Hand-built: embed the text around each placeholder, put the media rows in between.
    ids = llm.tokenizer(llm.render_prompt(request.messages), add_special_tokens=False)["input_ids"]
    img_id, aud_id = (llm.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<audio>"))
    i, j = ids.index(img_id), ids.index(aud_id)
    embed = llm.embed_tokens
    with torch.no_grad():
        expected = torch.cat(
            [
                embed(torch.tensor(ids[:i])),
                torch.from_numpy(image),
                embed(torch.tensor(ids[i + 1 : j])),
                torch.from_numpy(audio),
                embed(torch.tensor(ids[j + 1 :])),
            ]
        )
    assert got.shape == (len(ids) - 2 + 3 + 2, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # Media pair with placeholders per modality: the order across modalities does not matter.
    swapped = LLMRequest(messages=request.messages, media=request.media[::-1])
    torch.testing.assert_close(llm.embed_prompt(swapped), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "text,media,message",
    [
        ("<image> <image>", ["image"], r"ask for 2 image .*media given are 1 image"),
        ("<image>", ["image", "image"], r"ask for 1 image .*media given are 2 image"),
        ("<audio> <image>", ["image", "image"], r"1 image, 1 audio \(audio image\).*2 image"),
        ("no placeholder", ["video"], r"ask for no media.*1 video"),
    ],
)
def test_placeholder_media_mismatch(llm, text, media, message):
    request = LLMRequest(messages=_user(text), media=[Embeddings(m, np.zeros((2, 32), np.float32)) for m in media])
    with pytest.raises(InvalidInputError, match=message):
        llm([request])


def test_request_checks(llm):
    with pytest.raises(InvalidInputError, match=r"max_tokens in \[1, 1024\], got 0"):
        llm([LLMRequest(messages=_user("hi"), max_tokens=0)])
    with pytest.raises(InvalidInputError, match="context of 2048"):
        llm([LLMRequest(messages=_user("x" * 2040), max_tokens=20)])
    with pytest.raises(UnsupportedMediaError, match=r"got \['smell'\]"):
        llm([LLMRequest(messages=_user("hi"), force_modalities=["smell"])])
    with pytest.raises(InvalidInputError, match="role in"):
        llm([LLMRequest(messages=[{"role": "robot", "content": "hi"}])])


def test_batched_decoding_equals_one_by_one(llm):
    requests = [
        LLMRequest(messages=_user("short"), max_tokens=12),
        LLMRequest(
            messages=_user("a much longer prompt <image> here"),
            media=[Embeddings("image", RNG.standard_normal((5, 32)).astype(np.float32))],
            max_tokens=9,
            force_modalities=["audio"],
        ),
        LLMRequest(messages=_user("sampled"), max_tokens=10, temperature=0.9, top_p=0.8, seed=3),
    ]
    together = llm(requests)
    alone = [llm([r])[0] for r in requests]
    for a, b in zip(together, alone):
        assert a.text == b.text and a.completion_tokens == b.completion_tokens
        assert [s.modality for s in a.signals] == [s.modality for s in b.signals]
        for sa, sb in zip(a.signals, b.signals):
            np.testing.assert_allclose(sa.hidden, sb.hidden, atol=1e-4)


def test_forced_group_follows_the_text_and_records_hidden_states(llm):
    request = LLMRequest(messages=_user("draw"), max_tokens=6, force_modalities=["image", "audio"])
    result = llm([request])[0]
    assert [(s.modality, s.hidden.shape) for s in result.signals] == [("image", (4, 32)), ("audio", (8, 32))]
    assert result.finish_reason == "length"
    assert result.completion_tokens == 6 + 4 + 8

    # Recompute without the KV cache: each signal row is the last layer's state at the position
    # predicting that token, plus the token's input embedding.
    prompt_ids = llm.tokenizer(llm.render_prompt(request.messages), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + result.token_ids])
    with torch.no_grad():
        hidden = llm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        embeds = llm.embed_tokens(ids[0])
    for group, start in zip(result.signals, (len(prompt_ids) + 6, len(prompt_ids) + 10)):
        expected = hidden[start - 1 : start - 1 + len(group.hidden)] + embeds[start : start + len(group.hidden)]
        np.testing.assert_allclose(group.hidden, expected.numpy(), atol=1e-4)


def _steer(llm, token_id, at_step):
    """Make ``token_id`` the model's own choice at generated token ``at_step`` (1-based)."""
    steps = []

    def hook(module, args, output):
        steps.append(1)
        if len(steps) == at_step:
            output[..., token_id] += 1e4
        return output

    return llm.model.get_output_embeddings().register_forward_hook(hook)


def test_emitting_a_group_start_forces_the_rest(llm):
    img0 = llm.groups["image"][0]
    handle = _steer(llm, img0, at_step=2)
    try:
        result = llm([LLMRequest(messages=_user("hello"), max_tokens=8)])[0]
    finally:
        handle.remove()
    assert result.token_ids[1:5] == llm.groups["image"]
    assert [(s.modality, s.hidden.shape) for s in result.signals] == [("image", (4, 32))]
    assert result.completion_tokens == 8 + 4  # the group is not counted against max_tokens
    assert "[IMG" not in result.text


def test_seeded_sampling_is_reproducible(llm):
    def run(seed):
        return llm([LLMRequest(messages=_user("tell me"), max_tokens=30, temperature=1.0, seed=seed)])[0].text

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_stop_string_cuts_the_text(llm):
    z = llm.tokenizer.convert_tokens_to_ids("Z")
    results = []
    for stop in ([], ["Z"]):
        handle = _steer(llm, z, at_step=4)
        try:
            results.append(llm([LLMRequest(messages=_user("go"), max_tokens=10, stop=stop)])[0])
        finally:
            handle.remove()
    full, stopped = results
    assert full.token_ids[3] == z and full.finish_reason == "length"
    assert stopped.token_ids == full.token_ids[:4]
    assert stopped.finish_reason == "stop"
    assert stopped.text == llm.tokenizer.decode(full.token_ids[:3], skip_special_tokens=True)


def _run(engine, requests):
    """Submit ``requests`` to the engine together; each one's text delta per step (``""`` for a
    step that gave it none), and its result."""
    for i, request in enumerate(requests):
        engine.add(str(i), request)
    deltas, results = [[] for _ in requests], [None] * len(requests)
    while engine.has_work():
        step = {out.request_id: out for out in engine.step()}
        for i in range(len(requests)):
            if results[i] is None:
                out = step.get(str(i))
                deltas[i].append(out.delta if out else "")
                results[i] = out.result if out else None
    return deltas, results


def test_stream_yields_the_text_piece_by_piece(llm):
    requests = [
        LLMRequest(messages=_user("one"), max_tokens=12),
        LLMRequest(messages=_user("two, longer"), max_tokens=5, force_modalities=["image"]),
    ]
    deltas, results = _run(llm.engine, requests)
    assert max(sum(1 for piece in d if piece) for d in deltas) > 1  # text arrived over several steps
    assert ["".join(d) for d in deltas] == [r.text for r in results]
    assert [r.text for r in results] == [r.text for r in llm(requests)]


def test_stream_holds_back_a_possible_stop_string(llm):
    z = llm.tokenizer.convert_tokens_to_ids("Z")
    handle = _steer(llm, z, at_step=4)
    try:
        (streamed,), (result,) = _run(llm.engine, [LLMRequest(messages=_user("go"), max_tokens=10, stop=["Zq"])])
    finally:
        handle.remove()
    # "Z" could start the stop string "Zq", so it is not sent until the next token shows it is not.
    assert result.token_ids[3] == z
    assert "Z" not in "".join(streamed[:4])
    assert "Z" in "".join(streamed[4:]) and "".join(streamed) == result.text
