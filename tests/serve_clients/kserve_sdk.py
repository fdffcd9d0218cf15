"""The KServe Python SDK against a live `gpu-mdf serve` (run by tests/test_serve_clients.py
in a process of its own: the SDK's protobuf module and tritonclient.grpc's define the same
"inference" package and cannot share a process).

    python kserve_sdk.py HTTP_URL GRPC_ADDRESS TOKEN MODEL IMAGES.npy OUT.npz

Writes the probabilities each route answered, under rest_json, rest_binary and grpc.
"""

import asyncio
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request(model: str, x: np.ndarray, binary: bool) -> InferRequest:
    tensor = InferInput(name="pixels", shape=list(x.shape), datatype="UINT8")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id="kserve-1",
                        parameters={"binary_data_output": True} if binary else None)


async def main(url, grpc_address, token, model, images, out):
    x = np.load(images)
    headers = {"Authorization": f"Bearer {token}"}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=60))
    results = {}
    assert await rest.is_server_ready(url, headers=headers)
    assert await rest.is_model_ready(url, model, headers=headers)
    for binary in (False, True):
        r = await rest.infer(url, request(model, x, binary), model_name=model, headers=headers)
        assert r.id == "kserve-1" and r.model_name == model, r
        results["rest_binary" if binary else "rest_json"] = r.outputs[0].as_numpy()
    await rest.close()
    client = InferenceGRPCClient(grpc_address, timeout=60)
    metadata = (("authorization", f"Bearer {token}"),)
    assert await client.is_server_ready(headers=metadata)
    r = await client.infer(request(model, x, True), headers=metadata)
    results["grpc"] = r.outputs[0].as_numpy()
    await client.close()
    np.savez(out, **results)
    print("ok", {k: v.shape for k, v in results.items()})


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
