"""The extractor worker: a FramesReady chunk in, each sample's feature in Redis, one FeatureReady out.

One process serves one extractor kind (= stream) for every run; each kind is its own consumer
group on the frames topics, so every kind sees every sample. Samples of a chunk that do not ask for
this kind are skipped. The options of the extractor (e.g. the flow method) travel with the job, and
one instance per distinct options is kept. A chunk costs three Redis round trips (the samples' states,
their frames in one MGET, their features in one MULTI) and one notice. When a sample's frames are gone
from Redis (expired, or Redis restarted) and its feature was never made, its decode job is published
again, alone: at-least-once, never a lost sample, and the rest of the chunk goes on.
"""

from __future__ import annotations

import json
import logging
import time
from typing import ClassVar

import numpy as np

from essp.clients.kafka import Received
from essp.contract import DecodeChunk, DecodeJob, FeatureReady, FramesReady, Message
from essp.dataplane.extractors import FeatureExtractor, MixedFrames, create_extractor, extractor_kinds
from essp.dataplane.payloads import CONSUMED, EXTRACTED, SampleStore
from essp.dataplane.resident import ResidentWorker
from essp.settings import Settings

log = logging.getLogger("essp.extract")


class ExtractWorker(ResidentWorker):
    family: ClassVar[str] = "extract"

    def __init__(self, settings: Settings, extractor: str, **kwargs) -> None:  # noqa: ANN003
        if extractor not in extractor_kinds():
            raise ValueError(f"unknown extractor kind {extractor!r}; registered: {', '.join(extractor_kinds())}")
        self.kind = extractor
        super().__init__(settings, **kwargs)
        self._extractors: dict[str, FeatureExtractor] = {}
        self._stores: dict[str, SampleStore] = {}
        self.counters.update({"work_cpu_s": 0.0, "reannounced": 0})

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

    def give_up(self, received: Received, reason: str, *, run: str | None) -> None:
        """Every sample of the notice still to extract for this stream is dead-lettered by name for this
        stream and abandoned for it; the other streams of the sample go on."""
        notice = received.message
        assert isinstance(notice, FramesReady)
        mine = [job for job in notice.jobs if self.kind in job.features]
        store = self.store(notice.run)
        for job, state in zip(mine, store.stream_states([job.sample_id for job in mine], self.kind), strict=True):
            if state in (EXTRACTED, CONSUMED):
                continue
            store.abandon(job.sample_id, list(job.features), stream=self.kind)
            self.dead_letter(received, reason, run=job.run, epoch=job.epoch, sample_id=job.sample_id,
                             video=job.video, stream=self.kind, payload=job)

    def handle(self, received: Received) -> None:
        notice = received.message
        assert isinstance(notice, FramesReady)
        mine = [job for job in notice.jobs if self.kind in job.features]
        if not mine:
            return  # the samples do not feed this stream
        store = self.store(notice.run)
        states = store.stream_states([job.sample_id for job in mine], self.kind)
        todo: list[DecodeJob] = []
        ready: list[DecodeJob] = []  # extracted before (a redelivered notice): announced again
        for job, state in zip(mine, states, strict=True):
            if state == CONSUMED:
                self.count("duplicates")
            elif state == EXTRACTED and store.feature_meta(self.kind, job.sample_id) is not None:
                # The worker that wrote it may have died before its notice was acknowledged.
                ready.append(job)
                self.count("reannounced")
            else:
                todo.append(job)
        redo: list[DecodeJob] = []
        features: list[tuple[str, np.ndarray]] = []
        made: list[DecodeJob] = []
        for job, frames in zip(todo, store.get_frames_many([job.sample_id for job in todo]), strict=True):
            if frames is None:
                redo.append(job)  # frames expired or lost before this stream was extracted: decode again
                continue
            feature = self._extract(received, store, job, frames)
            if feature is not None:
                features.append((job.sample_id, feature))
                made.append(job)
        store.put_features(self.kind, features)
        self.count("jobs_done", len(made))
        if redo:
            self.publish(self.topics.decode(notice.run, notice.epoch), DecodeChunk(jobs=redo), key=redo[0].sample_id)
            self.count("redone", len(redo))
        if made or ready:
            jobs = made + ready
            self.publish(self.topics.ready(notice.run, self.kind, notice.epoch),
                         FeatureReady(jobs=jobs, extractor=self.kind, stream=self.kind), key=jobs[0].sample_id)

    def _extract(self, received: Received, store: SampleStore, job: DecodeJob,  # noqa: ANN202
                 frames: np.ndarray | MixedFrames):
        try:
            extractor = self.extractor(job.features[self.kind])
        except ValueError as exc:
            self._fail(received, store, job, f"extractor {self.kind} options {job.features[self.kind]}: {exc}")
            return None
        started = time.thread_time()
        try:
            return extractor.extract_stored(frames)
        except Exception as exc:  # noqa: BLE001 - a sample the extractor cannot handle is dead-lettered
            self._fail(received, store, job, f"extractor {self.kind} failed on {job.video} "
                                             f"frames {job.offset}..{job.offset + job.length}: {exc}")
            return None
        finally:
            self.count("work_cpu_s", time.thread_time() - started)

    def _fail(self, received: Received, store: SampleStore, job: DecodeJob, reason: str) -> None:
        log.warning("sample %s of run %s: %s", job.sample_id, job.run, reason)
        self.count("failures")
        store.abandon(job.sample_id, list(job.features), stream=self.kind)
        self.dead_letter(received, reason, run=job.run, epoch=job.epoch, sample_id=job.sample_id,
                         video=job.video, stream=self.kind, payload=job)
