"""Legacy WeChat data decryption, checked against WeChat's own published sample."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.wechat.crypto import DecryptFailed, MalformedInput, decrypt_payload, encrypt_payload

# WeChat's published sample for "open data" decryption (the WXBizDataCrypt demo of
# the mini program docs), carried as-is by SDK test suites, e.g. binarywang/WxJava
# weixin-java-miniapp/src/test/java/cn/binarywang/wx/miniapp/util/crypt/WxMaCryptUtilsTest.java.
# Only the data is copied. It contains "+" and "/", so it also pins the standard alphabet.
SAMPLE_APPID = "wx4f4bc4dec97d474b"
SAMPLE_SESSION_KEY = "tiihtNczf5v6AKRyjwEUhQ=="
SAMPLE_IV = "r7BXXKkLb8qrSNn05n0qiA=="
SAMPLE_ENCRYPTED = (
    "CiyLU1Aw2KjvrjMdj8YKliAjtP4gsMZMQmRzooG2xrDcvSnxIMXFufNstNGTyaGS"
    "9uT5geRa0W4oTOb1WT7fJlAC+oNPdbB+3hVbJSRgv+4lGOETKUQz6OYStslQ142d"
    "NCuabNPGBzlooOmB231qMM85d2/fV6ChevvXvQP8Hkue1poOFtnEtpyxVLW1zAo6"
    "/1Xx1COxFvrc2d7UL/lmHInNlxuacJXwu0fjpXfz/YqYzBIBzD6WUfTIF9GRHpOn"
    "/Hz7saL8xz+W//FRAUid1OksQaQx4CMs8LOddcQhULW4ucetDf96JcR3g0gfRK4P"
    "C7E/r7Z6xNrXd2UIeorGj5Ef7b1pJAYB6Y5anaHqZ9J6nKEBvB4DnNLIVWSgARns"
    "/8wR2SiRS7MNACwTyrGvt9ts8p12PKFdlqYTopNHR1Vf7XjfhQlVsAJdNiKdYmYV"
    "oKlaRv85IfVunYzO0IKXsyl7JCUjCpoG20f0a04COwfneQAGGwd5oa+T8yO5hzuy"
    "Db/XcxxmK01EpqOyuxINew=="
)

KEY = base64.b64encode(bytes(range(16))).decode()
IV = base64.b64encode(bytes(range(16, 32))).decode()
APPID = "wxtestappid0000001"


def raw_encrypt(plaintext: bytes, *, pad: bool = True, key: str = KEY, iv: str = IV) -> str:
    """AES-128-CBC the way WeChat does, or without padding to forge a bad last block."""
    if pad:
        padder = padding.PKCS7(128).padder()
        plaintext = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(
        algorithms.AES(base64.b64decode(key)), modes.CBC(base64.b64decode(iv))
    ).encryptor()
    return base64.b64encode(encryptor.update(plaintext) + encryptor.finalize()).decode()


def test_wechat_published_sample_decrypts() -> None:
    data = decrypt_payload(SAMPLE_SESSION_KEY, SAMPLE_ENCRYPTED, SAMPLE_IV, SAMPLE_APPID)
    assert data["nickName"] == "Band"
    assert data["openId"] == "oGZUI0egBJY1zhBYw2KhdUfwVJJE"
    assert data["unionId"] == "ocMvos6NjeKLIBqg5Mr9QjxrP1FA"
    assert data["gender"] == 1
    assert (data["city"], data["province"], data["country"]) == ("Guangzhou", "Guangdong", "CN")
    assert data["watermark"] == {"timestamp": 1477314187, "appid": SAMPLE_APPID}


def test_published_sample_for_another_appid_is_refused() -> None:
    with pytest.raises(DecryptFailed):
        decrypt_payload(SAMPLE_SESSION_KEY, SAMPLE_ENCRYPTED, SAMPLE_IV, APPID)


def test_round_trip() -> None:
    payload = {
        "phoneNumber": "+8613800138000",
        "purePhoneNumber": "13800138000",
        "countryCode": "86",
        "nickName": "微信用户",
        "watermark": {"appid": APPID, "timestamp": 1700000000},
    }
    encrypted = encrypt_payload(KEY, payload, IV)
    assert decrypt_payload(KEY, encrypted, IV, APPID) == payload


def test_encrypt_reproduces_the_published_sample() -> None:
    # WeChat serialises compactly in key order; so do we, hence byte-for-byte equality.
    data = decrypt_payload(SAMPLE_SESSION_KEY, SAMPLE_ENCRYPTED, SAMPLE_IV, SAMPLE_APPID)
    assert encrypt_payload(SAMPLE_SESSION_KEY, data, SAMPLE_IV) == SAMPLE_ENCRYPTED


@pytest.mark.parametrize(
    "watermark",
    [
        {"appid": "wx-some-other-app", "timestamp": 1},
        {"appid": APPID[:-1], "timestamp": 1},
        {"appid": APPID + "x", "timestamp": 1},
        {"appid": "", "timestamp": 1},
        {"appid": None},
        {"appid": 12345},
        {"timestamp": 1},
        "not an object",
        None,
    ],
)
def test_watermark_must_name_our_appid(watermark: object) -> None:
    encrypted = encrypt_payload(KEY, {"openId": "o1", "watermark": watermark}, IV)
    with pytest.raises(DecryptFailed):
        decrypt_payload(KEY, encrypted, IV, APPID)


def test_missing_watermark() -> None:
    encrypted = encrypt_payload(KEY, {"openId": "o1"}, IV)
    with pytest.raises(DecryptFailed):
        decrypt_payload(KEY, encrypted, IV, APPID)


BAD_BASE64 = [
    "not base64!",
    "abc",  # missing padding
    "YWJj ZGVm",  # embedded space (a "+" that went through form decoding)
    "-_-_-_-_-_-_-_-_-_-_-w==",  # URL-safe alphabet is not what WeChat sends
    "YWJjZGVm\n",
    "é",
]


@pytest.mark.parametrize("bad", BAD_BASE64)
@pytest.mark.parametrize("field", ["session_key", "encrypted_data", "iv"])
def test_bad_base64_in_any_input_is_malformed(field: str, bad: str) -> None:
    args = {"session_key": KEY, "encrypted_data": raw_encrypt(b"{}"), "iv": IV}
    args[field] = bad
    with pytest.raises(MalformedInput) as info:
        decrypt_payload(args["session_key"], args["encrypted_data"], args["iv"], APPID)
    assert field in str(info.value)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 24, 32])
def test_wrong_key_length_is_malformed(size: int) -> None:
    # 24 and 32 bytes would be valid AES-192/256 keys: WeChat session keys never are.
    key = base64.b64encode(b"k" * size).decode()
    with pytest.raises(MalformedInput):
        decrypt_payload(key, raw_encrypt(b"{}"), IV, APPID)
    with pytest.raises(MalformedInput):
        encrypt_payload(key, {}, IV)


@pytest.mark.parametrize("size", [0, 8, 15, 17, 32])
def test_wrong_iv_length_is_malformed(size: int) -> None:
    iv = base64.b64encode(b"i" * size).decode()
    with pytest.raises(MalformedInput):
        decrypt_payload(KEY, raw_encrypt(b"{}"), iv, APPID)


@pytest.mark.parametrize(
    "last_block",
    [
        b"A" * 15 + b"\x00",  # a zero pad length
        b"A" * 15 + b"\x11",  # longer than a block
        b"A" * 13 + b"\x02\x03\x03",  # pad bytes that disagree
    ],
)
def test_bad_padding_fails(last_block: bytes) -> None:
    encrypted = raw_encrypt(b'{"watermark":{}}' + last_block, pad=False)
    with pytest.raises(DecryptFailed):
        decrypt_payload(KEY, encrypted, IV, APPID)


def test_wrong_key_fails() -> None:
    other = base64.b64encode(b"\x00" * 16).decode()
    with pytest.raises(DecryptFailed):
        decrypt_payload(other, SAMPLE_ENCRYPTED, SAMPLE_IV, SAMPLE_APPID)


@pytest.mark.parametrize("keep", [0, 1, 15, 17, 303])
def test_truncated_ciphertext_is_decrypt_failed(keep: int) -> None:
    # Valid base64 that is not a whole number of AES blocks: a ciphertext that does
    # not decrypt, so DecryptFailed (MalformedInput is for the encoding and sizes).
    raw = base64.b64decode(SAMPLE_ENCRYPTED)[:keep]
    with pytest.raises(DecryptFailed):
        decrypt_payload(SAMPLE_SESSION_KEY, base64.b64encode(raw).decode(), SAMPLE_IV, SAMPLE_APPID)


@pytest.mark.parametrize(
    "plaintext",
    [
        b"not json at all",
        b'[{"watermark": {"appid": "wxtestappid0000001"}}]',  # an array, not an object
        b'"a string"',
        b"42",
        b"null",
        b'{"watermark": {"appid": "wxtestappid0000001"}, "x": NaN}',
        b"\xff\xfe{}",  # not UTF-8
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting must not escape as RecursionError
    ],
)
def test_plaintext_must_be_a_json_object(plaintext: bytes) -> None:
    with pytest.raises(DecryptFailed):
        decrypt_payload(KEY, raw_encrypt(plaintext), IV, APPID)


def test_failures_do_not_reveal_why_or_what() -> None:
    """Padding, JSON and watermark failures read the same and quote nothing secret."""
    secret_plaintext = b'{"phoneNumber": "13800138000", "watermark": {"appid": "other"}}'
    cases = [
        raw_encrypt(b"A" * 15 + b"\x00", pad=False),
        raw_encrypt(b"\xffsecret-plaintext"),
        raw_encrypt(secret_plaintext),
    ]
    messages = set()
    for encrypted in cases:
        with pytest.raises(DecryptFailed) as info:
            decrypt_payload(KEY, encrypted, IV, APPID)
        text = str(info.value)
        messages.add(text)
        assert KEY not in text
        assert "13800138000" not in text and "secret" not in text
        # The original (e.g. a UnicodeDecodeError quoting a byte) is not chained.
        assert info.value.__cause__ is None
    assert len(messages) == 1


def test_malformed_messages_never_quote_the_key() -> None:
    key = "c2Vzc2lvbi1rZXktMjQtYnl0ZXMtbG9uZw=="  # valid base64, 24 bytes
    for bad_key in (key, key + "!"):
        with pytest.raises(MalformedInput) as info:
            decrypt_payload(bad_key, raw_encrypt(b"{}"), IV, APPID)
        assert key not in str(info.value)


def test_encrypted_output_is_standard_base64() -> None:
    encrypted = encrypt_payload(KEY, {"watermark": {"appid": APPID}, "pad": "x" * 200}, IV)
    assert base64.b64encode(base64.b64decode(encrypted, validate=True)).decode() == encrypted
    assert json.loads(json.dumps(decrypt_payload(KEY, encrypted, IV, APPID)))["pad"] == "x" * 200
