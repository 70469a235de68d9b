"""Locust load tests of a running clipserve (seed 000's `load_tests/locustfile.py`).

    locust -f load_tests/locustfile.py --host http://127.0.0.1:8000            # web UI on :8089
    locust -f load_tests/locustfile.py --host URL --headless -u 5 -r 5 -t 2m    # load-test-light
    python load_tests/run_ci.py                                                 # load-test-ci

Users mix the service's main paths, weighted as production traffic tends to be: single
evaluations, batch evaluations, `/v1/embeddings` (texts, images, both), score matrices, and a
collection search once a collection exists (created by the first user, from the same photos).
Images are real photos (skimage's), sent inline as data URIs so no network is needed.

Thresholds (the seed's three: throughput, p95 latency, error rate) are checked when the run ends
and set the exit code: `--max-fail-ratio` (0.01), `--max-p95-ms` (5000), `--min-rps` (1.0).
A request answered 429 or 503 with `Retry-After` (backpressure) is counted as a failure too: a
load that the service sheds is not a load it carries.
"""

from __future__ import annotations

import base64
import io
import logging
import random
from typing import Any

from locust import HttpUser, between, events, task
from locust.env import Environment

logger = logging.getLogger(__name__)

PROMPTS = (
    "a photo of an astronaut",
    "a cup of coffee on a table",
    "a cat sitting on a sofa",
    "a rocket launching into the sky",
    "a black and white photo of a man",
    "a red car parked in front of a house",
)
COLLECTION = "loadtest"


def _photos() -> list[str]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera"):
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image.thumbnail((320, 320))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        out.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return out


PHOTOS = _photos()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--max-fail-ratio", type=float, default=0.01, help="at most this share")
    parser.add_argument("--max-p95-ms", type=float, default=5000.0, help="p95 of all requests")
    parser.add_argument("--min-rps", type=float, default=1.0, help="requests per second")
    parser.add_argument("--api-key", default="", help="sent as Authorization: Bearer")


@events.quitting.add_listener
def _thresholds(environment: Environment, **_: Any) -> None:
    stats = environment.stats.total
    options = environment.parsed_options
    if options is None or stats.num_requests == 0:
        logger.error("no request was made")
        environment.process_exit_code = 1
        return
    p95 = stats.get_response_time_percentile(0.95)
    checks = (  # (what, value, limit): at least the limit for the rate, at most for the others
        ("error rate", stats.fail_ratio, options.max_fail_ratio),
        ("p95 ms", p95, options.max_p95_ms),
        ("requests/s", stats.total_rps, options.min_rps),
    )
    failed = False
    for name, value, limit in checks:
        ok = value >= limit if name == "requests/s" else value <= limit
        print(f"threshold {name}: {value:.4g} (limit {limit:g}) {'ok' if ok else 'FAILED'}")
        failed = failed or not ok
    environment.process_exit_code = 1 if failed else 0


class ClipserveUser(HttpUser):
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        key = self.environment.parsed_options.api_key if self.environment.parsed_options else ""
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"
        self.searchable = self._collection()

    def _collection(self) -> bool:
        """Create the search collection once (another user may have made it: 409 is fine)."""
        with self.client.post(
            "/v1/collections",
            json={"name": COLLECTION},
            name="setup: collection",
            catch_response=True,
        ) as response:
            if response.status_code not in (201, 409):
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return False
            response.success()
        items = [{"id": f"photo-{i}", "image": uri} for i, uri in enumerate(PHOTOS)]
        response = self.client.post(
            f"/v1/collections/{COLLECTION}/items", json={"items": items}, name="setup: add items"
        )
        return response.status_code == 200

    @task(5)
    def single_evaluation(self) -> None:
        body = {"image_input": random.choice(PHOTOS), "text_prompt": random.choice(PROMPTS)}
        self.client.post("/evaluator/v1/evaluation/single", json=body, name="evaluation single")

    @task(2)
    def batch_evaluation(self) -> None:
        pairs = [
            {"image_input": random.choice(PHOTOS), "text_prompt": random.choice(PROMPTS)}
            for _ in range(8)
        ]
        self.client.post(
            "/evaluator/v1/evaluation/batch",
            json={"evaluations": pairs, "batch_size": 8, "show_progress": False},
            name="evaluation batch",
        )

    @task(3)
    def embeddings(self) -> None:
        inputs = random.sample(PROMPTS, 3) + [{"image": random.choice(PHOTOS)}]
        self.client.post(
            "/v1/embeddings",
            json={"input": inputs, "encoding_format": "base64"},
            name="embeddings mix",
        )

    @task(1)
    def score_matrix(self) -> None:
        body = {"images": random.sample(PHOTOS, 2), "texts": random.sample(PROMPTS, 3)}
        self.client.post("/v1/score", json=body, name="score matrix")

    @task(1)
    def search(self) -> None:
        if self.searchable:
            body = {"text": random.choice(PROMPTS), "top_k": 3}
            self.client.post(f"/v1/collections/{COLLECTION}/search", json=body, name="search")
