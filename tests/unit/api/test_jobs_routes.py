"""/v1/jobs over the fake backend: JSON and CSV submissions, status, JSON Lines results that
equal the synchronous endpoints' answers, cancel, and clear errors."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from clipserve.testing import FakeLoader


@pytest.fixture
async def client(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    return await client_for(make_settings(jobs={"chunk_size": 3}), FakeLoader())


@pytest.fixture
def uri(photo_bytes: Callable[..., bytes]) -> str:
    return "data:image/png;base64," + base64.b64encode(photo_bytes("astronaut", "PNG")).decode()


async def until_finished(client: Any, job_id: str) -> dict[str, Any]:
    for _ in range(2000):
        body: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if body["state"] in ("succeeded", "failed", "cancelled"):
            return body
        await asyncio.sleep(0.005)
    raise AssertionError(f"job {job_id} did not finish")


async def results(client: Any, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/jobs/{job_id}/results")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    return [json.loads(line) for line in response.text.splitlines()]


async def test_an_embed_job_gives_the_embeddings_of_v1_embeddings(
    client: Any, uri: str, assert_vectors_close: Callable[[Any, Any], None]
) -> None:
    items = [{"text": f"caption {i}"} for i in range(5)] + [{"image": uri}, {"text": " "}]
    submitted = await client.post(
        "/v1/jobs", json={"type": "embed", "model": "fast", "items": items}
    )
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert submitted.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["state"], job["counts"]["total"], job["chunks"]) == ("queued", 7, 3)
    done = await until_finished(client, job["id"])
    assert done["state"] == "succeeded"
    assert done["counts"] == {"total": 7, "done": 7, "succeeded": 6, "failed": 1}
    assert done["progress"] == 1.0
    assert done["errors"] == [{"index": 6, "error": "the text is empty (or only whitespace)"}]
    rows = await results(client, job["id"])
    assert [r["index"] for r in rows] == list(range(7))
    reference = await client.post(
        "/v1/embeddings",
        json={"model": "fast", "input": [*(f"caption {i}" for i in range(5)), {"image": uri}]},
    )
    for row, data in zip(rows[:6], reference.json()["data"], strict=True):
        assert_vectors_close(row["embedding"], data["embedding"])
    assert rows[6] == {"index": 6, "error": "the text is empty (or only whitespace)"}


async def test_a_score_job_from_a_csv_gives_the_scores_of_evaluate(
    client: Any, tmp_path: Any, photo_bytes: Callable[..., bytes]
) -> None:
    (tmp_path / "a.png").write_bytes(photo_bytes("astronaut", "PNG"))
    csv = "image_input,caption\na.png,an astronaut\na.png,a cup of coffee\nmissing.png,x\n"
    submitted = await client.post(
        "/v1/jobs",
        data={"type": "score", "model": "fast"},
        files={"file": ("pairs.csv", csv.encode(), "text/csv")},
    )
    assert submitted.status_code == 202, submitted.text
    done = await until_finished(client, submitted.json()["id"])
    assert done["counts"]["succeeded"] == 2
    assert done["counts"]["failed"] == 1
    rows = await results(client, done["id"])
    single = await client.post(
        "/evaluator/v1/evaluation/single",
        json={"image_input": "a.png", "text_prompt": "an astronaut", "model_config_name": "fast"},
    )
    assert rows[0]["clip_score"] == pytest.approx(single.json()["clip_score"], abs=1e-4)
    assert rows[0]["model_used"] == "fast"
    assert rows[0]["error"] is None
    assert rows[2]["clip_score"] is None
    assert "missing.png" in rows[2]["error"]


async def test_cancel_and_unknown_jobs(client: Any) -> None:
    items = [{"text": f"t{i}"} for i in range(30)]
    job = (await client.post("/v1/jobs", json={"type": "embed", "items": items})).json()
    cancelled = await client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200
    assert cancelled.json()["state"] in ("cancelled", "succeeded")  # it may have finished first
    final = await until_finished(client, job["id"])
    assert final["state"] == cancelled.json()["state"]
    for method, path in (
        ("GET", "/v1/jobs/nope"),
        ("GET", "/v1/jobs/nope/results"),
        ("DELETE", "/v1/jobs/nope"),
    ):
        missing = await client.request(method, path)
        assert missing.status_code == 404
        assert missing.json()["error"] == "job 'nope' does not exist"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"type": "embed", "items": []}, "at least 1 item"),
        ({"type": "score", "items": [{"text": "t"}]}, "a score item needs both image and text"),
        ({"type": "embed", "items": [{"text": "t", "image": "a.png"}]}, "one text or one image"),
        ({"type": "translate", "items": [{"text": "t"}]}, "'embed' or 'score'"),
        ({"type": "embed", "items": [{"text": "t", "colour": "red"}]}, "Extra inputs"),
    ],
)
async def test_bad_submissions_are_422(client: Any, body: dict[str, Any], fragment: str) -> None:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert fragment in json.dumps(response.json())


async def test_an_unknown_model_is_404_at_submission(client: Any) -> None:
    response = await client.post(
        "/v1/jobs", json={"type": "embed", "model": "nope", "items": [{"text": "t"}]}
    )
    assert response.status_code == 404
    assert "model config 'nope' is unknown" in response.json()["error"]


@pytest.mark.parametrize(
    ("csv", "kind", "fragment"),
    [
        (b"", "embed", "the CSV is empty"),
        (b"name,colour\nx,red\n", "embed", "needs an image or a text column; found: name, colour"),
        (b"text\nhello\n", "score", "needs an image column and a text column"),
        (b"image,text\n", "score", "a header but no rows"),
        (b"image,text\n,hello\n", "score", "CSV row 2: the image column is empty"),
        (b"\xff\xfe", "embed", "not UTF-8"),
    ],
)
async def test_bad_csv_uploads_are_422(client: Any, csv: bytes, kind: str, fragment: str) -> None:
    response = await client.post(
        "/v1/jobs", data={"type": kind}, files={"file": ("x.csv", csv, "text/csv")}
    )
    assert response.status_code == 422, response.text
    assert fragment in response.json()["error"]


async def test_the_job_size_limit(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(jobs={"max_items": 2}), FakeLoader())
    items = [{"text": "t"}] * 3
    response = await client.post("/v1/jobs", json={"type": "embed", "items": items})
    assert response.status_code == 422
    assert response.json()["error"] == "the job has 3 items; the limit is 2 (jobs.max_items)"
