// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @notice Test only: a token that, on every transfer while armed, calls back into a target (the escrow)
/// with prepared calldata, and records whether that re-entry succeeded and what it returned.
contract HostileToken is ERC20 {
    address public target;
    bytes public attack;
    bool public armed;
    uint256 public attempts;
    bool public lastReentryOk;
    bytes public lastReentryResult;
    bool private _inAttack;

    constructor() ERC20("Hostile", "HOST") {}

    function decimals() public pure override returns (uint8) {
        return 6;
    }

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function arm(address target_, bytes calldata attack_) external {
        target = target_;
        attack = attack_;
        armed = true;
    }

    function disarm() external {
        armed = false;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (armed && !_inAttack && from != address(0)) {
            _inAttack = true;
            attempts += 1;
            (bool ok, bytes memory result) = target.call(attack);
            lastReentryOk = ok;
            lastReentryResult = result;
            _inAttack = false;
        }
    }
}
