"""Compatibility surfaces: other servers' request and answer shapes, translated to the native schemas and back.

One module per surface, each with its schemas, a translate-in (their request -> a native body) and a
translate-out (a finished job -> their answer); the routes in api/routes/compat_*.py only call these and
`api.serving.generate`, so every surface runs the one generation path.

    shared.py   what several surfaces need: model-name aliases, A1111 sampler names, <lora:...> tags, uploads
    seeds.py    the earlier servers (seeds 000, 003, 004)
    openai.py   the OpenAI Images API
    a1111.py    the AUTOMATIC1111 web UI API
"""
