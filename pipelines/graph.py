"""The five-stage graph of one config, defined once for every executor.

A config names some encoders, an input projector, the LLM, an output projector and some
generators. :class:`Graph` knows which of them a config has, in the order a request meets them,
what passes along each hop, and the shape contract of each hop. The executors (``LocalPipeline``
in process, the Serve app, the Ray Data jobs) load the stages their own way, collect each loaded
stage's :func:`ports`, and call :meth:`Graph.check` before they take any work: a head that does
not fit its generator fails there, naming both shapes, rather than on every request.

    modality file --EncodedMedia--> {m}_encoder --Features--> input_projector --Embeddings--> llm
    llm --SignalGroup--> output_projector --Conditioning--> {m}_generator --GeneratedMedia-->

The ``Features`` hop also carries the text the medium came with (``Features.instruction``): an
input projector may read the question as well as the medium (InstructBLIP's Q-Former). The
encoder never sees it; the executor that routes the features to the projector adds it, from the
parsed chat (``ParsedChat.instructions``): ``LocalPipeline`` in process, the HTTP ingress as an
argument of its call to the projector pool (it holds only a reference to the features), the
caption job from its ``instruction`` column. For a tiled image (LLaVA-NeXT) it carries the image's
original size too (``Features.image_size``), which the encoder sets and the projector's packing
reads; the caption job keeps it in an ``image_size`` column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omnistage.cluster.config import OmnistageConfig


@dataclass(frozen=True)
class Hop:
    """One edge of the graph: ``producer``'s ``payload`` for ``modality`` goes to ``consumer``."""

    producer: str
    consumer: str
    payload: str
    modality: str


@dataclass(frozen=True)
class Graph:
    """The stages one config has, and the hops between them."""

    encoders: tuple[str, ...]
    generators: tuple[str, ...]
    # The input projector runs inside the encoders' replicas rather than in a pool of its own.
    projector_with_encoders: bool = False

    @classmethod
    def of(cls, config: OmnistageConfig) -> Graph:
        projector = config.stages.input_projector
        fused = projector is not None and projector.placement == "encoders"
        return cls(tuple(config.stages.input_modalities()), tuple(config.stages.output_modalities()), fused)

    @property
    def stages(self) -> list[str]:
        """Stage names in the order a request meets them (the config's ``stages`` keys)."""
        names = [f"{m}_encoder" for m in self.encoders]
        names += ["input_projector"] if self.encoders else []
        names += ["llm"]
        names += ["output_projector"] if self.generators else []
        return names + [f"{m}_generator" for m in self.generators]

    @property
    def pools(self) -> dict[str, tuple[str, ...]]:
        """Each pool of replicas a distributed executor deploys, named after its first stage, and
        the stages one replica runs on each batch, in order. A stage fused into its neighbour's
        pool keeps its own class, config and hop contract; only the hop's transfer disappears."""
        if not self.projector_with_encoders:
            return {name: (name,) for name in self.stages}
        pools = {name: (name, "input_projector") if name.endswith("_encoder") else (name,) for name in self.stages}
        del pools["input_projector"]
        return pools

    @property
    def hops(self) -> list[Hop]:
        into = [Hop(f"{m}_encoder", "input_projector", "Features", m) for m in self.encoders]
        into += [Hop("input_projector", "llm", "Embeddings", m) for m in self.encoders]
        out = [Hop("llm", "output_projector", "SignalGroup", m) for m in self.generators]
        out += [Hop("output_projector", f"{m}_generator", "Conditioning", m) for m in self.generators]
        return into + out

    def check(self, ports: dict[str, dict[str, Any]]) -> None:
        """Raise ``ValueError`` naming both sides unless every hop between two stages in ``ports``
        (stage name -> :func:`ports` of the loaded stage) fits. A job that runs part of the graph
        passes the ports of that part only."""
        projector = ports.get("input_projector")
        if self.projector_with_encoders and projector is not None:
            reading = sorted(m for m, head in projector["heads"].items() if head.get("reads_instruction"))
            if reading:
                # An encoder's replica gets the medium only, never the text it came with.
                raise ValueError(
                    f"the input projector's {' and '.join(reading)} head reads the text each medium comes with, which "
                    "reaches it only in a pool of its own: expected input_projector.placement 'pool', got 'encoders'"
                )
        for hop in self.hops:
            if hop.producer in ports and hop.consumer in ports:
                _CHECKS[hop.payload](hop.modality, ports[hop.producer], ports[hop.consumer])


def understanding(modality: str) -> list[str]:
    """The stages a request about one ``modality`` medium passes, up to the LLM's answer."""
    return [f"{modality}_encoder", "input_projector", "llm"]


def generation(modality: str) -> list[str]:
    """The stages a request for one ``modality`` medium passes, from the LLM's signal tokens."""
    return ["llm", "output_projector", f"{modality}_generator"]


def ports(name: str, stage: Any) -> dict[str, Any]:
    """What loaded stage ``name`` produces and accepts, as plain data (a replica sends it back)."""
    if name.endswith("_encoder"):
        return {"feature_dim": stage.feature_dim}
    if name in ("input_projector", "output_projector"):
        heads = {m: dict(stage.head_spec(m)) for m in stage.modalities}
        if name == "output_projector":
            for m, head in heads.items():
                head["conditioning"] = stage.conditioning_shape(m)
                head["generated_conditioning"] = stage.generated_shape(m)
        return {"heads": heads}
    if name == "llm":
        cross = stage.cross_attention
        return {
            "hidden_size": stage.hidden_size,
            "signal_modalities": sorted(stage.groups),
            "fusion": dict(stage.fusion),
            "cross_attention_width": cross.width if cross is not None else None,
        }
    return {
        "conditioning": stage.conditioning_shape,
        "generated_conditioning": stage.generated_shape,
        "pipeline": type(stage.pipeline).__name__,
    }


def _shape(shape: tuple[int | None, int]) -> str:
    length, width = shape
    return f"({length if length is not None else 'any'}, {width})"


def _fits(producer: str, produced: tuple[int, int], consumer: str, expected: tuple[int | None, int]) -> None:
    """Raise unless ``produced`` fits ``expected`` (a None length takes any)."""
    length, width = expected
    if produced[1] != width or (length is not None and produced[0] != length):
        raise ValueError(f"{producer} of shape {tuple(produced)}, but {consumer} {_shape(expected)}")


def _head(projector: str, modality: str, heads: dict[str, Any]) -> dict[str, Any]:
    if modality not in heads:
        raise ValueError(f"the {projector.replace('_', ' ')} has heads for {list(heads)}, not {modality!r}")
    return heads[modality]


def _features(modality: str, encoder: dict[str, Any], projector: dict[str, Any]) -> None:
    head = _head("input_projector", modality, projector["heads"])
    if head["in_dim"] != encoder["feature_dim"]:
        raise ValueError(
            f"the {modality} encoder gives features of width {encoder['feature_dim']}, "
            f"but the input projector's {modality} head expects {head['in_dim']}"
        )


def _embeddings(modality: str, projector: dict[str, Any], llm: dict[str, Any]) -> None:
    head = _head("input_projector", modality, projector["heads"])
    fusion = head.get("fusion", "splice")
    if fusion != llm["fusion"][modality]:
        raise ValueError(
            f"the input projector's {modality} head feeds the LLM by {fusion}, "
            f"but the LLM reads {modality} by {llm['fusion'][modality]}"
        )
    width, what = (llm["cross_attention_width"], "cross-attention layers read") if fusion == "cross_attention" else (llm["hidden_size"], "embeddings have")
    if head["out_dim"] != width:
        raise ValueError(f"the input projector's {modality} head outputs width {head['out_dim']}, but the LLM's {what} width {width}")


def _signal_group(modality: str, llm: dict[str, Any], projector: dict[str, Any]) -> None:
    if modality not in llm["signal_modalities"]:
        raise ValueError(
            f"the LLM has signal tokens for {llm['signal_modalities']}, not {modality!r}; add it to llm.signal_tokens"
        )
    head = _head("output_projector", modality, projector["heads"])
    if head["in_dim"] != llm["hidden_size"]:
        raise ValueError(
            f"the output projector's {modality} head reads width {head['in_dim']}, "
            f"but the LLM's hidden states have width {llm['hidden_size']}"
        )


def _conditioning(modality: str, projector: dict[str, Any], generator: dict[str, Any]) -> None:
    head = _head("output_projector", modality, projector["heads"])
    _fits(
        f"the output projector's {modality} head produces conditioning",
        head["conditioning"],
        f"the {modality} generator expects",
        generator["conditioning"],
    )
    # A second conditioning (AudioLDM 2's generated_prompt_embeds) must be made exactly where the
    # generator takes one.
    produced, expected, pipeline = head["generated_conditioning"], generator["generated_conditioning"], generator["pipeline"]
    if produced is None and expected is not None:
        raise ValueError(
            f"the output projector's {modality} head produces no generated conditioning, but the {modality} "
            f"generator ({pipeline}) expects generated conditioning of shape {_shape(expected)}; give the head "
            f"a 'generated' head spec"
        )
    if produced is not None and expected is None:
        raise ValueError(
            f"the output projector's {modality} head produces generated conditioning of shape {tuple(produced)}, "
            f"but the {modality} generator ({pipeline}) takes none"
        )
    if produced is not None:
        _fits(
            f"the output projector's {modality} head produces generated conditioning",
            produced,
            f"the {modality} generator expects",
            expected,
        )


_CHECKS = {"Features": _features, "Embeddings": _embeddings, "SignalGroup": _signal_group, "Conditioning": _conditioning}
