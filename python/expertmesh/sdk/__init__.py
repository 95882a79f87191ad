"""Python SDK for an expertmesh server: `Client` (blocking) and `AsyncClient` (asyncio).

    from expertmesh.sdk import Client
    client = Client("http://127.0.0.1:8000")
    print(client.completion("The experts of a mixture", max_tokens=16).choices[0].text)
    for chunk in client.chat([{"role": "user", "content": "hi"}], stream=True): ...
"""

from expertmesh.sdk.client import AsyncClient, Client
from expertmesh.sdk.errors import (APIConnectionError, APIError, AuthenticationError, BadRequestError, NotFoundError,
                                   RateLimitError, RequestTooLargeError, ServiceUnavailableError)
from expertmesh.server.protocol import ChatCompletion, Completion, Usage

__all__ = ["AsyncClient", "Client", "APIError", "APIConnectionError", "AuthenticationError", "BadRequestError",
           "NotFoundError", "RateLimitError", "RequestTooLargeError", "ServiceUnavailableError", "ChatCompletion",
           "Completion", "Usage"]
