"""Everything that talks WeChat: the API client, access tokens, legacy
decryption, and the fake WeChat used for development and tests."""
