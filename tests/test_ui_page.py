"""The page's files as the server sends them (fast, no browser): fields, static assets, nothing from elsewhere."""

from __future__ import annotations

import re

import pytest

# What seed 000's form collected, under this page's names, plus the task switch and uploads.
FORM_FIELDS = [
    'name="task"', 'id="model"', 'id="prompt"', 'id="negative_prompt"', 'id="steps"', 'id="cfg_scale"',
    'id="strength"', 'id="seed"', 'id="number_of_images"', 'name="lora_name_1"', 'name="lora_weight_1"',
    'name="lora_scale_1"', 'name="lora_name_2"', 'name="lora_weight_2"', 'name="lora_scale_2"',
    'id="input-image"', 'id="mask-canvas"', 'id="progress"', 'id="cancel"', 'id="gallery"',
]


def test_root_serves_the_page_with_every_field(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for field in FORM_FIELDS:
        assert field in response.text, field


@pytest.mark.parametrize(("path", "media_type"), [
    ("/static/app.js", "javascript"), ("/static/style.css", "text/css"), ("/static/index.html", "text/html"),
])
def test_static_files_are_served(client, path, media_type):
    response = client.get(path)
    assert response.status_code == 200
    assert media_type in response.headers["content-type"]


def test_page_loads_nothing_from_other_hosts(client):
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(path).text
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path
        assert "@import" not in text and "cdn" not in text.lower(), path


def test_static_files_stay_in_their_folder(client):
    for path in ("/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "create_app" not in response.text
