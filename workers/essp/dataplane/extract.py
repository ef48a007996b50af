"""The extractor worker: FramesReady in, one feature in Redis and a FeatureReady notice out.

One process serves one extractor kind (= stream) for every run; each kind is its own consumer
group on the frames topics, so every kind sees every sample. A notice for a sample that does not
ask for this kind is committed without work. The options of the extractor (e.g. the flow method)
travel with the job, and one instance per distinct options is kept. When the frames are gone from
Redis (expired, or Redis restarted) and the feature was never made, the decode job is published
again: at-least-once, never a lost sample.
"""

from __future__ import annotations

import json
import logging
from typing import ClassVar

from essp.clients.kafka import Received
from essp.contract import DecodeJob, FeatureReady, FramesReady, Message
from essp.dataplane.extractors import FeatureExtractor, create_extractor, extractor_kinds
from essp.dataplane.payloads import CONSUMED, EXTRACTED, SampleStore
from essp.dataplane.resident import ResidentWorker
from essp.settings import Settings

log = logging.getLogger("essp.extract")


class ExtractWorker(ResidentWorker):
    family: ClassVar[str] = "extract"
    max_records: ClassVar[int] = 2

    def __init__(self, settings: Settings, extractor: str, **kwargs) -> None:  # noqa: ANN003
        if extractor not in extractor_kinds():
            raise ValueError(f"unknown extractor kind {extractor!r}; registered: {', '.join(extractor_kinds())}")
        self.kind = extractor
        super().__init__(settings, **kwargs)
        self._extractors: dict[str, FeatureExtractor] = {}
        self._stores: dict[str, SampleStore] = {}

    def group_id(self) -> str:
        return f"{self.settings.topic_prefix}.extract.{self.kind}"

    def pattern(self) -> str:
        return self.topics.frames_pattern(self.run_filter)

    def expected(self) -> tuple[type[Message], ...]:
        return (FramesReady,)

    def store(self, run: str) -> SampleStore:
        if run not in self._stores:
            self._stores[run] = SampleStore(self.settings, run)
        return self._stores[run]

    def extractor(self, options: dict) -> FeatureExtractor:
        key = json.dumps(options, sort_keys=True)
        if key not in self._extractors:
            self._extractors[key] = create_extractor(self.kind, options)
        return self._extractors[key]

    def handle(self, received: Received) -> None:
        notice = received.message
        assert isinstance(notice, FramesReady)
        job = notice.job
        if self.kind not in job.features:
            return  # the sample does not feed this stream
        store = self.store(job.run)
        state = store.stream_state(job.sample_id, self.kind)
        if state == CONSUMED:
            self.count("duplicates")
            return
        if state == EXTRACTED:
            # The feature is in Redis, but the worker that wrote it may have died before its notice was
            # acknowledged: announce it again (the trainer's take counts a second notice as a duplicate).
            meta = store.feature_meta(self.kind, job.sample_id)
            if meta is not None:
                self._announce(job, store, *meta)
                self.count("reannounced")
                return
        try:
            extractor = self.extractor(job.features[self.kind])
        except ValueError as exc:
            self._fail(received, store, f"extractor {self.kind} options {job.features[self.kind]}: {exc}")
            return
        frames = store.get_frames(job.sample_id)
        if frames is None:
            # Frames expired or Redis lost them before this stream was extracted: decode again.
            self.publish(self.topics.decode(job.run), job, key=job.sample_id)
            self.count("redone")
            return
        try:
            feature = extractor.extract(frames)
        except Exception as exc:  # noqa: BLE001 - a sample the extractor cannot handle is dead-lettered
            self._fail(received, store, f"extractor {self.kind} failed on {job.video} "
                                        f"frames {job.offset}..{job.offset + job.length}: {exc}")
            return
        store.put_feature(self.kind, job.sample_id, feature)
        self._announce(job, store, list(feature.shape), str(feature.dtype))
        self.count("jobs_done")

    def _announce(self, job: DecodeJob, store: SampleStore, shape: list[int], dtype: str) -> None:
        self.publish(self.topics.ready(job.run, self.kind),
                     FeatureReady(job=job, extractor=self.kind, stream=self.kind,
                                  key=store.feature_key(self.kind, job.sample_id), shape=shape, dtype=dtype),
                     key=job.sample_id)

    def _fail(self, received: Received, store: SampleStore, reason: str) -> None:
        job = received.message.job  # type: ignore[attr-defined]
        log.warning("sample %s of run %s: %s", job.sample_id, job.run, reason)
        self.count("failures")
        store.abandon(job.sample_id, list(job.features), stream=self.kind)
        self.dead_letter(received, reason, run=job.run, epoch=job.epoch, sample_id=job.sample_id,
                         video=job.video, stream=self.kind)
