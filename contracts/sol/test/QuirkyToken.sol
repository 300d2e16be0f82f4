// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @notice Test only: a token with the quirks real stablecoins have or may have. Any number of decimals; a fee
/// taken on every transfer (burned, as fee-on-transfer tokens deliver less than sent); one blocked address
/// whose incoming transfers revert (a blacklist); one address whose incoming `transfer`s return false
/// without moving anything (a token that does not revert); one address whose incoming transfers burn all the
/// gas they are given.
contract QuirkyToken is ERC20 {
    uint8 private immutable _decimals;
    uint16 public feeBps;
    address public blocked;
    address public falseFor;
    address public guzzleFor;

    error Blocked(address to);

    constructor(uint8 decimals_) ERC20("Quirky", "QRK") {
        _decimals = decimals_;
    }

    function decimals() public view override returns (uint8) {
        return _decimals;
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function setFeeBps(uint16 bps) external {
        feeBps = bps;
    }

    function setBlocked(address who) external {
        blocked = who;
    }

    function setFalseFor(address who) external {
        falseFor = who;
    }

    function setGuzzleFor(address who) external {
        guzzleFor = who;
    }

    function transfer(address to, uint256 value) public override returns (bool) {
        if (to == falseFor && to != address(0)) return false;
        return super.transfer(to, value);
    }

    function _update(address from, address to, uint256 value) internal override {
        if (to == blocked && to != address(0)) revert Blocked(to);
        if (to == guzzleFor && to != address(0)) {
            while (true) {}
        }
        uint256 fee = from == address(0) ? 0 : (value * feeBps) / 10_000;
        if (fee != 0) super._update(from, address(0), fee);
        super._update(from, to, value - fee);
    }
}
