"""Everything that talks WeChat: the API client, access tokens, legacy
decryption, and the fake WeChat used for development and tests.

May import: :mod:`gateway.config`, :mod:`gateway.errors`, :mod:`gateway.storage`
(the shared access token is stored), public aiohttp and cryptography.
"""
