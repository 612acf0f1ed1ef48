"""A WebSocket client (aiohttp): queue a workflow, print progress as it arrives, then fetch the images.

    python docs/api/ws_client.py --workflow docs/api/text_to_image.json --out out/
"""

import argparse
import asyncio
import json
import os
import uuid

import aiohttp


async def run(server, workflow, out, token=None, on_message=print):
    client_id = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        # Connect first, so no message about our prompt is missed.
        async with http.ws_connect(f"{server}/ws?clientId={client_id}") as ws:
            async with http.post(f"{server}/prompt", json={"prompt": workflow, "client_id": client_id}) as r:
                body = await r.json()
                if r.status != 200:
                    raise SystemExit(f"refused ({r.status}): {json.dumps(body, indent=1)}")
                prompt_id = body["prompt_id"]
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                on_message(event)
                data = event["data"]
                if data.get("prompt_id") != prompt_id:
                    continue
                if event["type"] in ("execution_error", "execution_interrupted"):
                    raise SystemExit(f"{event['type']}: {data.get('exception_message', '')}")
                if event["type"] == "executing" and data["node"] is None:
                    break  # this prompt is done
        async with http.get(f"{server}/history/{prompt_id}") as r:
            entry = (await r.json())[prompt_id]
        paths = []
        os.makedirs(out, exist_ok=True)
        for output in entry["outputs"].values():
            for image in output.get("images", []):
                async with http.get(f"{server}/view", params=image) as r:
                    path = os.path.join(out, image["filename"])
                    with open(path, "wb") as f:
                        f.write(await r.read())
                    paths.append(path)
        return prompt_id, paths


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--workflow", required=True)
    p.add_argument("--out", default=".")
    p.add_argument("--token", default=os.environ.get("EDGEGEN_TOKEN"))
    args = p.parse_args()
    with open(args.workflow) as f:
        workflow = json.load(f)

    def show(event):
        if event["type"] == "progress":
            d = event["data"]
            print(f"step {d['value']}/{d['max']}", flush=True)
        else:
            print(event["type"], flush=True)

    _, paths = asyncio.run(run(args.server, workflow, args.out, args.token, show))
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
